"""Soak test: 5,000 steps of a tiny MLP with subtrack, nothing goes wrong.

Issue 6, item 7. Marked ``slow``: left out by default (pyproject addopts);
run with ``python -m pytest -m slow tests/test_soak.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st

STEPS, CHUNK = 5_000, 250
D_IN, HIDDEN, D_OUT, BATCH = 32, 64, 16, 64


def _init(key):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
      "b1": jnp.zeros((HIDDEN,)),
      "w2": jax.random.normal(k2, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
      "b2": jnp.zeros((D_OUT,)),
  }


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grassmann", "svd"])
def test_soak_tiny_mlp_5000_steps(mode):
  teacher = _init(jax.random.key(1))
  teacher = dict(teacher, b1=0.3 * jnp.ones((HIDDEN,)))
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      st.subtrack(rank=4, update_interval=50, subspace_update=mode),
      optax.scale_by_learning_rate(optax.cosine_decay_schedule(1e-2, STEPS,
                                                               alpha=0.1)),
  )
  params = _init(jax.random.key(0))
  state = tx.init(params)

  def loss_fn(p, x):
    return jnp.mean((_mlp(p, x) - _mlp(teacher, x)) ** 2)

  @jax.jit
  def chunk(params, state, start):
    def step(carry, i):
      params, state = carry
      x = jax.random.normal(jax.random.fold_in(jax.random.key(2), i),
                            (BATCH, D_IN))
      loss, grads = jax.value_and_grad(loss_fn)(params, x)
      updates, state = tx.update(grads, state, params)
      ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(u))
                                for u in jax.tree.leaves(updates)]))
      return (optax.apply_updates(params, updates), state), (loss, ok)
    (params, state), (losses, ok) = jax.lax.scan(
        step, (params, state), start + jnp.arange(CHUNK))
    return params, state, losses, ok

  means = []
  for start in range(0, STEPS, CHUNK):
    params, state, losses, ok = chunk(params, state, start)
    assert bool(jnp.all(ok)), f"non-finite update in steps {start}+"
    assert bool(jnp.all(jnp.isfinite(losses)))
    means.append(float(jnp.mean(losses)))
  assert int(state[1].count) == STEPS
  for leaf in jax.tree.leaves((params, state)):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  basis = np.asarray(state[1].basis["w1"], np.float64)
  assert np.max(np.abs(basis.T @ basis - np.eye(4))) < 1e-4
  # The loss goes down: the last chunk is far below the first, and it
  # keeps improving over the second half of the run.
  assert means[-1] < 0.2 * means[0], means
  assert means[-1] < means[len(means) // 2], means
  print(f"{mode}: chunk mean losses {means[0]:.4g} -> {means[-1]:.4g}")
