r"""SubTrack++ with a Flax Linen model and ``jax.jit`` shardings (pjit style).

Runs on a laptop: 4 simulated CPU devices form a 2 x 2 ``(data, model)``
mesh with Auto axes (GSPMD). The model is a stack of MLP layers under
``nn.scan``, so each kernel is one ``(L, m, n)`` array whose ``L`` slices
are separate matrices for SubTrack (each with its own basis). The
parameters' specs come from their ``nn.with_partitioning`` annotations, the
optimizer state's from ``subtrack_optax.partition_specs``; both go to
``jax.jit`` as ``in_shardings``/``out_shardings``.

Usage::

  python examples/sharded_linen_pjit.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:  # simulated devices: set before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import subtrack_optax as st  # noqa: E402

EMBED, HIDDEN, LAYERS = 64, 128, 3


class Layer(nn.Module):
  """One residual MLP layer; kernels sharded over both mesh axes."""

  @nn.compact
  def __call__(self, x, _):
    init = nn.initializers.lecun_normal()
    h = nn.Dense(HIDDEN, kernel_init=nn.with_partitioning(
        init, ("data", "model")), bias_init=nn.with_partitioning(
            nn.initializers.zeros_init(), ("model",)))(x)
    h = nn.Dense(EMBED, use_bias=False, kernel_init=nn.with_partitioning(
        init, ("model", "data")))(nn.gelu(h))
    return x + h, None


class Stack(nn.Module):
  """``LAYERS`` layers scanned: kernels are ``(LAYERS, m, n)``."""

  @nn.compact
  def __call__(self, x):
    scanned = nn.scan(Layer, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=LAYERS,
                      metadata_params={nn.PARTITION_NAME: None})
    x, _ = scanned()(x, None)
    return nn.Dense(EMBED, use_bias=False, kernel_init=nn.with_partitioning(
        nn.initializers.lecun_normal(), ("data", "model")))(x)


def named(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)

  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  model = Stack()
  x0 = jnp.zeros((8, EMBED))
  # Parameter specs from the annotations, without allocating anything.
  abstract = jax.eval_shape(model.init, jax.random.key(0), x0)
  param_specs = nn.get_partition_spec(abstract)["params"]
  # (L, m, n) kernels: every slice is a matrix; the rest default to 2-D.
  tx = st.subtrack_adamw(1e-2, rank=4, update_interval=5, weight_decay=0.01)
  state_specs = st.partition_specs(tx, nn.unbox(abstract)["params"],
                                   param_specs, mesh=mesh)
  p_sh, s_sh = named(mesh, param_specs), named(mesh, state_specs)
  batch_sh = NamedSharding(mesh, P("data", None))

  init_params = jax.jit(
      lambda key: nn.unbox(model.init(key, x0))["params"], out_shardings=p_sh)
  init_state = jax.jit(tx.init, out_shardings=s_sh)

  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = jax.jit(step, in_shardings=(p_sh, s_sh, batch_sh, batch_sh),
                       out_shardings=(p_sh, s_sh, None),
                       donate_argnums=(0, 1))

  with jax.set_mesh(mesh):
    params = init_params(jax.random.key(0))
    opt_state = init_state(params)
    rng = np.random.default_rng(0)
    target = rng.standard_normal((EMBED, EMBED)).astype(np.float32) / 8
    losses = []
    for _ in range(args.steps):
      x = rng.standard_normal((16, EMBED)).astype(np.float32)
      params, opt_state, loss = train_step(params, opt_state, x,
                                           np.tanh(x @ target))
      losses.append(float(loss))

  sub = state_specs[0]
  kernel = lambda t: t["ScanLayer_0"]["Dense_1"]["kernel"]
  print("scanned (L, 128, 64) kernel, spec",
        kernel(param_specs), "-> basis", kernel(sub.basis),
        "mu/nu", kernel(sub.mu), "recovery_norm", kernel(sub.recovery_norm))
  leaves = jax.tree.leaves(opt_state)
  total = sum(leaf.nbytes for leaf in leaves)
  dev0 = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards
             if s.device == jax.devices()[0])
  print(f"optimizer state: {total} bytes, {dev0} on device 0 "
        f"({dev0 / total:.2f}; 1/4 = 0.25)")
  print(f"losses {losses[0]:.5f} -> {losses[-1]:.5f}")
  return losses


if __name__ == "__main__":
  main()
