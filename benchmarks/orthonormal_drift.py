"""Orthonormality drift of the tracked basis over many geodesic steps.

Runs ``subtrack_optax.grassmann_step`` ``--steps`` times on fresh Gaussian
gradients and prints ``max |S^T S - I|`` after 10^2, 10^3 and 10^4 steps,
with the library's correction (a Newton-Schulz step when a probe sees drift
above 1e-5) and without any correction (``reorthonormalize_if_needed``
replaced by the identity for the second run). The contract (SPEC section 3)
allows 1e-4 after 10^4 updates.

Usage::

  python benchmarks/orthonormal_drift.py            # d=64, D=96, r=8
  python benchmarks/orthonormal_drift.py --d 256 --big-d 512 --rank 32
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import subtrack_optax as st
from subtrack_optax import _linalg


def drift(d: int, big_d: int, rank: int, step_size: float, checkpoints):
  key = jax.random.key(0)
  s = jnp.linalg.qr(jax.random.normal(key, (d, rank)))[0]

  def body(i, s):
    x = jax.random.normal(jax.random.fold_in(key, i), (d, big_d))
    return st.grassmann_step(s, x, step_size)[0]

  out, done = {}, 0
  for n in checkpoints:
    s = jax.jit(lambda s, a=done, b=n: jax.lax.fori_loop(a, b, body, s))(s)
    done = n
    out[n] = float(jnp.abs(s.T @ s - jnp.eye(rank)).max())
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--d", type=int, default=64)
  parser.add_argument("--big-d", type=int, default=96)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--step-size", type=float, default=0.5)
  parser.add_argument("--steps", type=int, default=10_000)
  args = parser.parse_args(argv)
  checkpoints = [n for n in (100, 1000, 10_000) if n < args.steps]
  checkpoints.append(args.steps)
  shape = f"d={args.d}, D={args.big_d}, r={args.rank}"
  results = {}
  for label in ("with correction", "no correction"):
    original = _linalg.reorthonormalize_if_needed
    if label == "no correction":
      _linalg.reorthonormalize_if_needed = lambda ss, tol=0.0: [
          s.astype(jnp.float32) for s in ss]
    try:
      results[label] = drift(args.d, args.big_d, args.rank, args.step_size,
                             checkpoints)
    finally:
      _linalg.reorthonormalize_if_needed = original
    print(f"{label:16s} ({shape}, step {args.step_size}): " + ", ".join(
        f"{n} steps {v:.1e}" for n, v in results[label].items()), flush=True)
  return results


if __name__ == "__main__":
  main()
