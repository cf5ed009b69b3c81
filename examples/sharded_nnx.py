r"""SubTrack++ with ``nnx.Optimizer`` on a sharded Flax NNX model.

Runs on a laptop: 4 simulated CPU devices form a 2 x 2 ``(data, model)``
mesh. The model's parameters carry sharding annotations
(``nnx.with_partitioning``). A plain ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` works: ``tx.init`` gives each optimizer-state variable its
own sharding metadata (the low-rank state is a ``(d, r)`` basis, ``(r, D)``
moments and a per-matrix scalar, not the parameter's shape), which is
exactly ``subtrack_optax.partition_specs``. The script checks that, trains
a few steps, then checks that the losses match an unsharded run.

Usage::

  python examples/sharded_nnx.py                  # Auto mesh axes (GSPMD)
  python examples/sharded_nnx.py --mode explicit  # sharding in types
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:  # simulated devices: set before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import subtrack_optax as st  # noqa: E402

EMBED, HEADS, HEAD_DIM, HIDDEN = 64, 4, 16, 128


class Block(nnx.Module):
  """A toy block: a 3-D attention-style projection plus an MLP."""

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    shard = nnx.with_partitioning
    # (embed, heads, head_dim) kernel, like an attention projection.
    self.wq = nnx.Param(shard(init, ("data", "model", None))(
        rngs.params(), (EMBED, HEADS, HEAD_DIM)))
    self.up = nnx.Linear(EMBED, HIDDEN, rngs=rngs,
                         kernel_init=shard(init, ("data", "model")),
                         bias_init=shard(nnx.initializers.zeros_init(),
                                         ("model",)))
    self.down = nnx.Linear(HIDDEN, EMBED, rngs=rngs, use_bias=False,
                           kernel_init=shard(init, ("model", "data")))

  def __call__(self, x):
    # Explicit axes: a contraction over an axis sharded on both sides needs
    # its output sharding; Auto axes: leave it to the compiler.
    explicit = jax.sharding.get_abstract_mesh().are_all_axes_explicit
    out = P("data", None) if explicit else None
    q = jnp.einsum("be,ehd->bhd", x, self.wq[...])  # HEADS * HEAD_DIM = EMBED
    h = jax.nn.gelu(self.up(x))
    return q.reshape(x.shape) + self.down(h, out_sharding=out)


def dimension_numbers(params):
  """The 3-D kernel is one (embed) x (heads * head_dim) matrix."""
  return jax.tree.map_with_path(
      lambda path, x: st.SubTrackDimensionNumbers(0, (1, 2))
      if "wq" in jax.tree_util.keystr(path) else
      (st.SubTrackDimensionNumbers(0, 1) if x.ndim == 2 else None), params)


def make_tx():
  return st.subtrack_adamw(1e-2, rank=4, update_interval=4, weight_decay=0.01,
                           dimension_numbers=dimension_numbers)


def check_state_specs(optimizer, model, tx):
  """What NNX reports for the optimizer state is ``partition_specs``."""
  params = nnx.state(model, nnx.Param)
  specs = st.partition_specs(tx, nnx.as_pure(params),
                             nnx.as_pure(nnx.get_partition_spec(params)))
  reported = nnx.as_pure(nnx.get_partition_spec(optimizer.opt_state))
  is_spec = lambda x: isinstance(x, P)
  assert ([tuple(s) for s in jax.tree.leaves(reported, is_leaf=is_spec)] ==
          [tuple(s) for s in jax.tree.leaves(specs, is_leaf=is_spec)])
  return specs


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def batches(steps, batch=16):
  rng = np.random.default_rng(0)
  target = rng.standard_normal((EMBED, EMBED)).astype(np.float32) / 8
  for _ in range(steps):
    x = rng.standard_normal((batch, EMBED)).astype(np.float32)
    yield x, np.tanh(x @ target)


def per_device_bytes(tree):
  total, device0 = 0, 0
  for leaf in jax.tree.leaves(tree):
    total += leaf.nbytes
    device0 += sum(s.data.nbytes for s in leaf.addressable_shards
                   if s.device == jax.devices()[0])
  return total, device0


def run(mesh, steps):
  """Trains ``steps`` steps; returns the losses (and prints the layout)."""
  tx = make_tx()
  with jax.set_mesh(mesh):
    model = Block(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    specs = check_state_specs(optimizer, model, tx)
    losses = []
    for x, y in batches(steps):
      x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
      losses.append(float(train_step(model, optimizer, x, y)))
    opt_arrays = nnx.as_pure(optimizer.opt_state)
  return losses, specs, opt_arrays


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("auto", "explicit"), default="auto")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)

  axis_type = AxisType.Auto if args.mode == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2,
                       devices=jax.devices()[:4])
  losses, specs, opt_arrays = run(mesh, args.steps)

  sub = specs[0]  # chain(subtrack, add_decayed_weights, scale_by_lr)
  print("parameter spec -> SubTrack basis (d, r) and moments (r, D) specs:")
  for name, spec in (("wq", "P('data', 'model', None)"),
                     ("up", "P('data', 'model')"),
                     ("down", "P('model', 'data')")):
    pick = (lambda t: t[name]) if name == "wq" else (
        lambda t: t[name]["kernel"])
    print(f"  {name:5s} {spec:25s} -> basis {pick(sub.basis)}, "
          f"mu/nu {pick(sub.mu)}, recovery_norm {pick(sub.recovery_norm)}")
  total, dev0 = per_device_bytes(opt_arrays)
  print(f"optimizer state: {total} bytes in all, {dev0} on device 0 "
        f"({dev0 / total:.2f} of it; 1/{len(mesh.devices.flat)} = "
        f"{1 / mesh.devices.size:.2f})")

  # The same training on one device: the losses agree to float32 rounding.
  single = jax.make_mesh((1, 1), ("data", "model"),
                         axis_types=(axis_type,) * 2, devices=jax.devices()[:1])
  reference, _, _ = run(single, args.steps)
  diff = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
  print(f"losses {losses[0]:.5f} -> {losses[-1]:.5f}; max relative "
        f"difference to one device {diff:.1e}")
  return diff


if __name__ == "__main__":
  main()
