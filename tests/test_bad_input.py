"""Bad input never passes silently (issue 12, items 3-6 and 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st

W = {"w": jnp.zeros((16, 32))}


def _g(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_transposed_gradient_is_rejected_naming_the_leaf():
  tx = st.subtrack(4)
  state = tx.init(W)
  with pytest.raises(ValueError, match=r"\['w'\].*\(16, 32\).*\(32, 16\)"):
    tx.update({"w": _g((32, 16))}, state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(basis_dtype=jnp.int32), "basis_dtype must be a floating"),
    (dict(mu_dtype=jnp.int8), "mu_dtype must be a floating"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(step_size=float("nan")), "step_size must be finite"),
    (dict(dimension_numbers=5), "dimension_numbers must be"),
    (dict(dimension_numbers="0,1"), "dimension_numbers must be"),
    (dict(dimension_numbers={"w": 3}), "dimension_numbers must be"),
])
def test_bad_options_raise_value_errors_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    st.subtrack(4, **kwargs)


def test_non_numbers_raise_type_errors_naming_them():
  with pytest.raises(TypeError, match="b1 must be a real number"):
    st.subtrack(4, b1="0.9")
  with pytest.raises(TypeError, match="reduction_axis .* must be an int"):
    st.subtrack(4, dimension_numbers=st.SubTrackDimensionNumbers(
        0.0, 1)).init(W)


@pytest.mark.parametrize("other,match", [
    (dict(rank=6), "rank 4.*rank 6"),
    (dict(rank=4, basis_side="large"), "d=16.*d=32"),
])
def test_state_from_another_configuration_is_named(other, match):
  state = st.subtrack(4).init(W)
  with pytest.raises(ValueError, match="different configuration"):
    st.subtrack(**other).update({"w": _g((16, 32))}, state)
  with pytest.raises(ValueError, match=match):
    st.subtrack(**other).update({"w": _g((16, 32))}, state)


def test_leaf_shrinking_below_the_rank_is_named():
  state = st.subtrack(4).init(W)
  with pytest.raises(ValueError, match=r"\['w'\].*dense"):
    st.subtrack(4).update({"w": _g((16, 3))}, state)


def test_zero_size_leaf_is_handled_like_optax():
  params = {"e": jnp.zeros((0, 8, 16)), "w": jnp.zeros((16, 32))}
  tx = st.subtrack(4)
  state = tx.init(params)
  grads = {"e": jnp.zeros((0, 8, 16)), "w": _g((16, 32))}
  u, state = jax.jit(tx.update)(grads, state)
  ref, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(
      params))
  assert u["e"].shape == (0, 8, 16)
  assert np.all(np.isfinite(u["w"]))
  assert ref["e"].shape == u["e"].shape


def test_diagnostics_report_nan_for_a_nan_gradient():
  tx = st.subtrack(4)
  s0 = tx.init(W)
  _, s1 = tx.update({"w": _g((16, 32))}, s0)
  d = st.subspace_diagnostics({"w": jnp.full((16, 32), jnp.nan)}, s1)
  assert np.isnan(d["['w']"].captured_energy)
  zero = st.subspace_diagnostics({"w": jnp.zeros((16, 32))}, s1)
  assert float(zero["['w']"].captured_energy) == 0.0
