"""Tests of subtrack_optax.subspace_diagnostics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st
from subtrack_optax import _diagnostics

RANK = 3
PARAMS = {
    "wide": jnp.zeros((12, 20)),       # m < n: basis on the reduction side
    "tall": jnp.zeros((20, 12)),       # m > n: basis on the output side
    "stack": jnp.zeros((2, 10, 16)),   # one batch axis
    "bias": jnp.zeros((20,)),          # dense
    "thin": jnp.zeros((20, 2)),        # min side <= rank: dense
}


def _grads(seed):
  keys = jax.random.split(jax.random.key(seed), len(PARAMS))
  return {k: jax.random.normal(key, v.shape)
          for key, (k, v) in zip(keys, sorted(PARAMS.items()))}


def _numpy_energy(x, s):
  p = s.T @ x
  return float(np.sum(p * p) / np.sum(x * x))


def _numpy_largest_angle(s0, s1):
  cos = np.linalg.svd(s0.T @ s1, compute_uv=False)
  resid = s1 - s0 @ (s0.T @ s1)
  sin = np.linalg.svd(resid, compute_uv=False)
  return float(np.arctan2(sin.max(), cos.min()))


def _canonical(g, side):
  """Plain-numpy canonical frame of a 2-D gradient (the SPEC's rule)."""
  m, n = g.shape
  basis_on_rows = (m <= n) if side == "small" else (m >= n)
  return g if basis_on_rows else g.T


@functools.lru_cache(maxsize=None)
def _stepper(basis_side, update_interval):
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   st.subtrack(RANK, update_interval, basis_side=basis_side,
                               step_size=0.4),
                   optax.scale(-1e-2))

  @jax.jit
  def step(grads, state):
    _, new_state = tx.update(grads, state, PARAMS)
    diag = st.subspace_diagnostics(grads, new_state, state,
                                   basis_side=basis_side)
    return new_state, diag

  return tx, step


@pytest.mark.parametrize("basis_side", ["small", "large"])
def test_energy_and_angle_match_numpy(basis_side):
  tx, step = _stepper(basis_side, 2)
  state = tx.init(PARAMS)
  state, d0 = step(_grads(0), state)       # t = 0: first basis
  state, d1 = step(_grads(1), state)       # t = 1: no update
  g2 = _grads(2)
  prev = state
  state, d2 = step(g2, state)              # t = 2: grassmann update
  assert set(d2) == {"['wide']", "['tall']", "['stack']"}
  # No previous basis at t = 0, no change at t = 1.
  assert np.isnan(np.asarray(d0["['wide']"].rotation_angle))
  assert float(d1["['wide']"].rotation_angle) == 0.0
  assert np.all(np.asarray(d1["['stack']"].rotation_angle) == 0.0)

  new_basis = st_state(state).basis
  old_basis = st_state(prev).basis
  for name in ("wide", "tall"):
    key = f"['{name}']"
    x = _canonical(np.asarray(g2[name]), basis_side)
    s1 = np.asarray(new_basis[name])
    s0 = np.asarray(old_basis[name])
    assert s1.shape == (x.shape[0], RANK)
    np.testing.assert_allclose(float(d2[key].captured_energy),
                               _numpy_energy(x, s1), rtol=1e-4)
    angle = float(d2[key].rotation_angle)
    assert 0.0 < angle <= 0.4 + 1e-5       # normalized step bounds it
    np.testing.assert_allclose(angle, _numpy_largest_angle(s0, s1),
                               rtol=1e-3, atol=1e-5)
  # Batch axis: one value per slice, each slice its own matrix.
  energy = np.asarray(d2["['stack']"].captured_energy)
  assert energy.shape == (2,)
  for i in range(2):
    np.testing.assert_allclose(
        energy[i], _numpy_energy(
            _canonical(np.asarray(g2["stack"][i]), basis_side),
            np.asarray(new_basis["stack"][i])),
        rtol=1e-4)


def st_state(state):
  return _diagnostics.find_subtrack_state(state)


def test_angle_equals_geodesic_step_angle():
  s = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (16, 4)))[0]
  x = jax.random.normal(jax.random.key(4), (16, 24))

  @jax.jit
  def f(s, x):
    s_new, theta = st.grassmann_step(s, x, 0.3)
    return _diagnostics._largest_principal_angle(s, s_new), theta

  angle, theta = f(s, x)
  assert float(theta) > 1e-3
  np.testing.assert_allclose(float(angle), float(theta), rtol=2e-3)


def test_energy_is_one_inside_and_zero_orthogonal():
  s = jnp.eye(8, 2)
  inside = jnp.zeros((8, 5)).at[:2].set(1.0)
  outside = jnp.zeros((8, 5)).at[4:].set(1.0)
  e = jax.jit(_diagnostics._energy)
  np.testing.assert_allclose(float(e(inside, s)), 1.0, rtol=1e-6)
  assert float(e(outside, s)) == 0.0
  assert float(e(jnp.zeros((8, 5)), s)) == 0.0


def test_found_in_nested_states():
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(st.subtrack, static_args=st.STATIC_ARGS)(
          rank=RANK, step_size=0.3))
  state = tx.init(PARAMS)
  found = _diagnostics.find_subtrack_state({"a": [optax.EmptyState(), state]})
  assert isinstance(found, st.SubTrackState)
  assert found.basis["wide"].shape == (12, RANK)
  assert isinstance(found.basis["bias"], optax.MaskedNode)


def test_without_prev_state_angle_is_none():
  tx, step = _stepper("small", 2)
  state, _ = step(_grads(5), tx.init(PARAMS))
  d = st.subspace_diagnostics(_grads(5), {"wrapped": (state,)})
  assert d["['tall']"].rotation_angle is None
  assert 0.0 < float(d["['tall']"].captured_energy) <= 1.0


def test_errors():
  grads = _grads(6)
  state = st.subtrack(RANK).init(PARAMS)
  with pytest.raises(ValueError, match="resolves to \\("):
    st.subspace_diagnostics(grads, state, basis_side="large")
  with pytest.raises(ValueError, match="resolves to dense"):
    st.subspace_diagnostics(grads, state,
                            dimension_numbers=dict.fromkeys(PARAMS))
  with pytest.raises(ValueError, match="found 0"):
    st.subspace_diagnostics(grads, optax.adam(1e-3).init(PARAMS))
  with pytest.raises(ValueError, match="found 2"):
    st.subspace_diagnostics(grads, (state, state))
