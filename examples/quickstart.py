"""Quickstart: a small Flax NNX model trained with SubTrack++ and with AdamW.

A 3-layer MLP regresses a fixed random teacher network on generated data.
Both optimizers see the same data and the same learning-rate schedule; the
script prints the training loss of each every few steps and the optimizer
state size.

Run:  python examples/quickstart.py [--steps 300] [--rank 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subtrack_optax as st


class MLP(nnx.Module):

  def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(din, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.l3 = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.gelu(self.l2(nnx.gelu(self.l1(x)))))


def make_data(key, n: int, din: int, dout: int):
  """A random teacher MLP's outputs on Gaussian inputs."""
  kx, kt = jax.random.split(key)
  x = jax.random.normal(kx, (n, din))
  teacher = MLP(din, 64, dout, rngs=nnx.Rngs(kt))
  return x, teacher(x)


def state_bytes(opt_state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
             if hasattr(x, "dtype"))


def train(name: str, tx, x, y, steps: int, batch: int, seed: int):
  model = MLP(x.shape[1], 128, y.shape[1], rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    loss_fn = lambda m: jnp.mean((m(xb) - yb) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  for i in range(steps):
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0,
                             x.shape[0])
    losses.append(float(step(model, optimizer, x[idx], y[idx])))
  seconds = time.perf_counter() - t0
  size = state_bytes(nnx.state(optimizer.opt_state))
  return losses, size, seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--update-interval", type=int, default=50)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  x, y = make_data(jax.random.key(1234), 4096, 32, 16)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10,
                                                args.steps)
  optimizers = {
      "adamw": optax.adamw(schedule),
      "subtrack": st.subtrack_adamw(schedule, rank=args.rank,
                                    update_interval=args.update_interval),
  }
  results = {}
  for name, tx in optimizers.items():
    results[name] = train(name, tx, x, y, args.steps, args.batch, args.seed)
  every = max(1, args.steps // 10)
  print(f"{'step':>6} " + " ".join(f"{n:>10}" for n in results))
  for i in list(range(0, args.steps, every)) + [args.steps - 1]:
    print(f"{i:>6} " + " ".join(f"{r[0][i]:>10.4f}" for r in results.values()))
  for name, (losses, size, seconds) in results.items():
    print(f"{name}: final loss {losses[-1]:.4f}, optimizer state "
          f"{size / 1024:.1f} KiB, {seconds:.1f} s")
  return {n: r[0] for n, r in results.items()}


if __name__ == "__main__":
  main()
