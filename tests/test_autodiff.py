"""Derivatives through ``tx.update`` (issue 12, item 7): ``jax.grad`` works.

The update's values come from loops and 0/1-trip gates; its derivatives are
those of the same update without them (``_engine.update_projected``, a
``jax.custom_jvp``). On an ordinary step (no new basis) they are exact; on
a step that computes a new basis they treat that basis as a constant.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st

K = 2   # update_interval: new bases at steps 0, 2, 4, ...


def _params():
  return {"w": jax.random.normal(jax.random.key(0), (8, 16)),
          "s": jax.random.normal(jax.random.key(1), (2, 8, 12)),
          "b": jnp.zeros(16)}


def _like(tree, seed):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(seed), x.shape), tree)


def _functional(tx, params):
  """``g, state -> (<update, c>, new state)``: a scalar of the update."""
  c = _like(params, 7)

  def f(g, state):
    u, new = tx.update(g, state, params)
    return sum(jnp.vdot(a, b) for a, b in
               zip(jax.tree.leaves(u), jax.tree.leaves(c))), new
  return f


def _dot(a, b):
  return float(sum(jnp.vdot(x, y) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _steps(tx, params, n=4):
  """``(g, state)`` before each of ``n`` steps."""
  state, out = tx.init(params), []
  for t in range(n):
    g = jax.tree.map(lambda x, t=t: jnp.cos(x) + 0.3 * t, params)
    out.append((g, state))
    _, state = jax.jit(tx.update)(g, state, params)
  return out


# (svd refreshes by the same mechanism as grassmann: a switch branch on
# stop_gradient inputs; left out to keep the suite short.)
@pytest.mark.parametrize("mode,stagger", [("grassmann", False),
                                          ("random", False),
                                          ("frozen", False),
                                          ("grassmann", True)])
def test_grad_through_update(mode, stagger):
  """``jax.grad`` works at every step (first basis, ordinary, refresh),
  equals forward mode, and agrees with central differences wherever no
  basis is computed from ``g``: ordinary steps, and the ``random`` mode's
  refreshes (its basis does not depend on the gradient)."""
  params = _params()
  tx = st.subtrack(rank=2, update_interval=K, subspace_update=mode,
                   stagger=stagger)
  f = _functional(tx, params)
  d, eps = _like(params, 5), 1e-3
  # Differentiable inputs: the gradient and (state) the first moments.
  grad = jax.jit(jax.grad(lambda g, mu, s: f(g, s._replace(mu=mu))[0],
                          argnums=(0, 1)))
  jvp = jax.jit(lambda g, s: jax.jvp(lambda g: f(g, s)[0], (g,), (d,))[1])
  value = jax.jit(lambda g, s: f(g, s)[0])
  checked = 0
  for t, (g, state) in enumerate(_steps(tx, params)):
    dg, dmu = grad(g, state.mu, state)
    assert all(bool(jnp.all(jnp.isfinite(x)))
               for x in jax.tree.leaves((dg, dmu)))
    assert float(jnp.abs(dmu["w"]).sum()) > 0     # Adam reads the moments
    np.testing.assert_allclose(_dot(dg, d), float(jvp(g, state)), rtol=1e-4,
                               atol=1e-5)
    new_basis = t % K == 0 and not (mode == "random" and t > 0)
    if stagger or new_basis:
      continue
    fd = (value(jax.tree.map(lambda a, b: a + eps * b, g, d), state) -
          value(jax.tree.map(lambda a, b: a - eps * b, g, d), state))
    np.testing.assert_allclose(_dot(dg, d), float(fd) / (2 * eps),
                               rtol=2e-2, atol=1e-2)
    checked += 1
  assert checked >= (0 if stagger else 2)


def test_meta_gradient_of_injected_hyperparameters():
  """d(loss after 3 steps)/d(learning rate, b1) through
  ``optax.inject_hyperparams``, against central differences (the only new
  basis is step 0's, which does not depend on them)."""
  params = _params()
  target = _like(params, 3)

  def loss(p):
    return sum(jnp.mean((a - b) ** 2) for a, b in
               zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  def meta(h):
    tx = optax.inject_hyperparams(st.subtrack_adamw,
                                  static_args=st.STATIC_ARGS)(
        learning_rate=h[0], b1=h[1], rank=2, update_interval=100)
    p, state = params, tx.init(params)
    for _ in range(3):
      u, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, u)
    return loss(p)

  h = jnp.array([5e-2, 0.9])
  grad = jax.jit(jax.grad(meta))(h)
  meta = jax.jit(meta)
  for i, eps in ((0, 1e-3), (1, 1e-2)):
    e = jnp.zeros(2).at[i].set(eps)
    fd = (meta(h + e) - meta(h - e)) / (2 * eps)
    np.testing.assert_allclose(float(grad[i]), float(fd), rtol=5e-2)
  assert float(grad[0]) < 0       # a larger step lowers this loss
