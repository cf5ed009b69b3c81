"""``nnx.Optimizer`` with subtrack on a sharded NNX model, out of the box.

Run by tests/test_nnx.py in a subprocess with 4 simulated CPU devices.
For each (devices, axis type) case it builds a model whose parameters carry
sharding annotations (``nnx.with_partitioning``), creates
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with no helper, trains a few
steps under ``nnx.jit`` and reports: the state specs NNX reports, the
shardings of the state arrays (after init and after training),
``subtrack_optax.partition_specs``' specs, and the losses next to a
one-device run. Prints one JSON object on its last stdout line.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import subtrack_optax as st  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 5  # update_interval=2: subspace init, refreshes at steps 2 and 4
MESHES = {2: (1, 2), 4: (2, 2)}  # devices -> (data, model) mesh shape


class Model(nnx.Module):
  """Every kind of leaf: 2-D both ways, scanned 3-D, attention 3-D, a
  bias, and a matrix too thin to project."""

  def __init__(self, rngs: nnx.Rngs):
    init, shard = nnx.initializers.lecun_normal(), nnx.with_partitioning
    param = lambda names, shape: nnx.Param(
        shard(init, names)(rngs.params(), shape))
    self.up = nnx.Linear(64, 128, rngs=rngs,
                         kernel_init=shard(init, ("data", "model")),
                         bias_init=shard(nnx.initializers.zeros_init(),
                                         ("model",)))
    self.scan = param((None, "data", "model"), (3, 64, 128))
    self.wq = param(("data", "model", None), (64, 4, 16))
    self.down = param(("model", "data"), (128, 64))
    self.thin = param(("data", None), (64, 4))

  def __call__(self, x):
    # Explicit axes: a contraction over an axis sharded on both sides needs
    # its output sharding; Auto axes: the compiler chooses.
    explicit = jax.sharding.get_abstract_mesh().are_all_axes_explicit
    out = P("data", None) if explicit else None
    mm = lambda a, b: jnp.matmul(a, b, out_sharding=out)
    h = jax.nn.gelu(self.up(x))
    for layer in range(3):
      h = h + jnp.tanh(mm(x, self.scan[layer]))
    q = jnp.einsum("be,ehd->bhd", x, self.wq[...]).reshape(x.shape)
    return q + mm(h, self.down[...]) + mm(mm(x, self.thin[...]),
                                          self.thin[...].T)


def dimension_numbers(params):
  """The attention kernel is one embed x (heads * head_dim) matrix."""
  def spec(path, x):
    if "wq" in jax.tree_util.keystr(path):
      return st.SubTrackDimensionNumbers(0, (1, 2))
    return st.SubTrackDimensionNumbers() if x.ndim >= 2 else None
  return jax.tree.map_with_path(spec, params)


def make_tx():
  return st.subtrack_adamw(1e-2, rank=4, update_interval=2, weight_decay=0.01,
                           dimension_numbers=dimension_numbers)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(
      lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def batches():
  rng = np.random.default_rng(0)
  target = rng.standard_normal((64, 64)).astype(np.float32) / 8
  for _ in range(STEPS):
    x = rng.standard_normal((8, 64)).astype(np.float32)
    yield x, np.tanh(x @ target)


def _norm(spec, ndim: int) -> str:
  """A spec as a string, padded with ``None`` to the array's rank."""
  spec = tuple(spec)
  return str(P(*(spec + (None,) * (ndim - len(spec)))))


def specs_of(tree, ndims):
  is_spec = lambda s: isinstance(s, P)
  return [_norm(s, n) for s, n in
          zip(jax.tree.leaves(tree, is_leaf=is_spec), ndims)]


def layout_mismatches(opt_state, specs, mesh):
  """Parameter names whose state arrays are not laid out (equivalently to)
  ``specs`` (``[path, wanted, actual]``)."""
  is_spec = lambda x: isinstance(x, P)
  arrays = jax.tree_util.tree_flatten_with_path(nnx.as_pure(opt_state))[0]
  bad = []
  for (path, a), spec in zip(arrays, jax.tree.leaves(specs, is_leaf=is_spec)):
    if not NamedSharding(mesh, spec).is_equivalent_to(a.sharding, a.ndim):
      bad.append([jax.tree_util.keystr(path), str(spec), str(a.sharding.spec)])
  return bad


def train(mesh, model, optimizer):
  losses = []
  for x, y in batches():
    x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    losses.append(float(train_step(model, optimizer, x, y)))
  return losses


def adamw_drift(mesh):
  """The same layout check for optax.adamw: what GSPMD moves by itself."""
  tx = optax.adamw(1e-2, weight_decay=0.01)
  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    want = nnx.as_pure(nnx.get_partition_spec(optimizer.opt_state))
    train(mesh, model, optimizer)
    return layout_mismatches(optimizer.opt_state, want, mesh)


def run(devices: int, axis_type):
  mesh = jax.make_mesh(MESHES.get(devices, (1, 1)), ("data", "model"),
                       axis_types=(axis_type,) * 2,
                       devices=jax.devices()[:devices])
  tx = make_tx()
  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    want = st.partition_specs(tx, nnx.as_pure(params),
                              nnx.as_pure(nnx.get_partition_spec(params)))
    ndims = [a.ndim for a in jax.tree.leaves(nnx.as_pure(optimizer.opt_state))]
    reported = nnx.as_pure(nnx.get_partition_spec(optimizer.opt_state))
    out = {"reported": specs_of(reported, ndims),
           "want": specs_of(want, ndims),
           "init": layout_mismatches(optimizer.opt_state, want, mesh)}
    out["losses"] = train(mesh, model, optimizer)
    out["trained"] = layout_mismatches(optimizer.opt_state, want, mesh)
    state = nnx.as_pure(optimizer.opt_state)
    out["bytes"] = sum(a.nbytes for a in jax.tree.leaves(state))
    out["device0_bytes"] = sum(
        s.data.nbytes for a in jax.tree.leaves(state)
        for s in a.addressable_shards if s.device == jax.devices()[0])
  if axis_type == AxisType.Auto:
    out["adamw_trained"] = adamw_drift(mesh)
  return out


def main():
  report = {"1:auto": run(1, AxisType.Auto)}  # the one-device reference
  for devices, name, axis_type in ((2, "auto", AxisType.Auto),
                                   (4, "auto", AxisType.Auto),
                                   (4, "explicit", AxisType.Explicit)):
    report[f"{devices}:{name}"] = run(devices, axis_type)
    print(devices, name, "done", flush=True, file=sys.stderr)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
