"""``list_leaves`` and the warnings at ``init`` (issue 13, item 6)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import subtrack_optax as st

DN = st.SubTrackDimensionNumbers


def _params():
  return {"w": jnp.zeros((32, 48)), "tall": jnp.zeros((80, 40)),
          "scan": jnp.zeros((3, 24, 40)), "thin": jnp.zeros((40, 3)),
          "b": jnp.zeros((48,)), "emb": jnp.zeros((50, 32))}


def _nbytes(tree):
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _dims(params):
  return {k: (None if k == "emb" else DN() if v.ndim >= 2 else None)
          for k, v in params.items()}


def test_each_leaf_how_and_why():
  tx = optax.chain(st.subtrack(rank=4, dimension_numbers=_dims),
                   optax.scale(-1e-3))
  with pytest.warns(UserWarning, match=r"\['thin'\]"):
    rows = {r.path: r for r in st.list_leaves(tx, _params())}
  assert set(rows) == {f"['{k}']" for k in _params()}
  w, tall, scan = rows["['w']"], rows["['tall']"], rows["['scan']"]
  assert (w.projected, w.d, w.big_d, w.rank, w.matrices) == (
      True, 32, 48, 4, 1)
  assert (tall.d, tall.big_d) == (40, 80)      # the basis spans the small side
  assert (scan.d, scan.big_d, scan.matrices) == (24, 40, 3)
  assert rows["['b']"].why == "dimension_numbers: dense"
  assert rows["['emb']"].why == "dimension_numbers: dense"
  assert rows["['thin']"].why == "40 x 3 matrix, a side <= rank 4"
  assert not any(rows[k].projected for k in ("['b']", "['emb']", "['thin']"))
  assert w.state_bytes == 4 * (2 * 4 * 48 + 32 * 4 + 1)
  assert w.adam_bytes == 4 * 2 * 32 * 48


def test_state_bytes_add_up_to_the_state():
  params = _params()
  tx = st.subtrack(rank=4, mu_dtype=jnp.bfloat16)
  rows = st.list_leaves(tx, params)
  state = tx.init(params)
  assert sum(r.state_bytes for r in rows) == _nbytes(state) - 4  # count
  assert sum(r.adam_bytes for r in rows) == 2 * _nbytes(params)


def test_default_rule_reasons_and_table():
  rows = st.list_leaves(st.subtrack(rank=4), _params())
  by = {r.path: r for r in rows}
  assert by["['b']"].why == "not a matrix"
  assert by["['emb']"].projected
  text = str(rows)
  assert text.splitlines()[0].split()[:3] == ["leaf", "shape", "handling"]
  assert "4 of 6 leaves projected" in text.splitlines()[-1]
  assert "['scan']" in text and "projected x3" in text


def test_inside_masked_and_on_nnx_variables():
  params = _params()
  mask = {k: k != "w" for k in params}
  rows = st.list_leaves(optax.masked(st.subtrack(rank=4), mask), params)
  assert "['w']" not in {r.path for r in rows} and len(rows) == 5
  boxed = {k: nnx.Param(v) for k, v in params.items()}
  assert st.list_leaves(st.subtrack(rank=4), boxed) == st.list_leaves(
      st.subtrack(rank=4), params)


def test_no_subtrack_is_an_error():
  with pytest.raises(ValueError, match="no subtrack"):
    st.list_leaves(optax.adam(1e-3), _params())


def test_warns_when_nothing_is_projected():
  tx = st.subtrack(rank=64)
  with pytest.warns(UserWarning, match="none of the 6 parameter leaves") as w:
    jax.jit(tx.init)(_params())
  assert w[0].filename == __file__     # it points at the caller's line


def test_warns_when_a_named_leaf_is_dense():
  dims = {"w": DN(), "thin": DN(), "complex": DN()}
  params = {"w": jnp.zeros((32, 48)), "thin": jnp.zeros((40, 3)),
            "complex": jnp.zeros((16, 16), jnp.complex64)}
  with pytest.warns(UserWarning, match="names 2 leaves") as w:
    st.subtrack(rank=4, dimension_numbers=dims).init(params)
  assert "['thin']" in str(w[0].message)
  assert "['complex'] (complex dtype)" in str(w[0].message)


def test_no_warning_for_an_ordinary_model():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    st.subtrack(rank=4).init(_params())
    st.subtrack(rank=4, dimension_numbers=_dims).init(
        {k: v for k, v in _params().items() if k != "thin"})
