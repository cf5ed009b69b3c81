"""Reliability: bad input, non-finite gradients, long runs, determinism.

Issue 6, items 1, 2, 3 and 5. Every check runs the transform under
``jax.jit``; jitted update functions are cached per configuration so that
the tests share compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st

RANK = 4
INTERVAL = 2  # refreshes at counts 2, 4, ...
MODES = tuple(st.SUBSPACE_UPDATES)


def _params():
  """A scanned (batch, m, n) leaf with m > n and a dense bias.

  Few projected leaves keep the compile time down; the batched leaf is the
  general case of the canonical frame (batch axis, transposed frame).
  """
  return {
      "k": jnp.zeros((3, 20, 16), jnp.float32),
      "b": jnp.zeros((40,), jnp.float32),
  }


def _grads(seed, scale=1.0):
  keys = jax.random.split(jax.random.key(seed), len(_params()))
  return {
      name: scale * jax.random.normal(k, leaf.shape, leaf.dtype)
      for k, (name, leaf) in zip(keys, sorted(_params().items()))
  }


@functools.lru_cache(maxsize=None)
def _tx(mode="grassmann", wrap_finite=False, **kw):
  tx = st.subtrack(RANK, INTERVAL, subspace_update=mode, **kw)
  if wrap_finite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=3)
  return tx, jax.jit(tx.update)


def _orth_err(s):
  """max |S^T S - I| over all batch slices, in float64 on the host."""
  s = np.asarray(jnp.asarray(s, jnp.float32), np.float64)
  gram = np.swapaxes(s, -1, -2) @ s
  return float(np.max(np.abs(gram - np.eye(s.shape[-1]))))


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _poison(tree, value, slice_index=None):
  """Puts ``value`` into every matrix slice of every leaf (or into one slice of ``k``)."""
  def put(path, x):
    name = path[0].key
    if slice_index is not None and name == "k":
      return x.at[slice_index, 3, 5].set(value)
    return x.at[..., 1].set(value) if x.ndim == 1 else x.at[..., 1, 1].set(
        value)
  return jax.tree_util.tree_map_with_path(put, tree)


# --------------------------------------------------------------------------
# 1. Construction and init errors.
# --------------------------------------------------------------------------

BAD_ARGS = [
    ("rank", 0, "positive int"),
    ("rank", -2, "positive int"),
    ("rank", 2.0, "positive int"),
    ("rank", "4", "positive int"),
    ("rank", True, "positive int"),
    ("update_interval", 0, "positive int"),
    ("update_interval", -5, "positive int"),
    ("update_interval", 2.5, "positive int"),
    ("b1", -0.1, "[0, 1)"),
    ("b1", 1.0, "[0, 1)"),
    ("b1", float("nan"), "[0, 1)"),
    ("b2", 1.0, "[0, 1)"),
    ("b2", -1e-3, "[0, 1)"),
    ("eps", -1e-8, ">= 0"),
    ("step_size", -0.5, ">= 0"),
    ("scale", 0.0, "> 0"),
    ("scale", -1.0, "> 0"),
    ("norm_growth_limit", 0.99, ">= 1"),
    ("subspace_update", "qr", "grassmann"),
    ("subspace_update", "GRASSMANN", "grassmann"),
    ("basis_side", "left", "small"),
]


@pytest.mark.parametrize("name,value,accepted", BAD_ARGS,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_ARGS])
def test_construction_error_names_argument_and_range(name, value, accepted):
  kwargs = {"rank": RANK, name: value}
  with pytest.raises(ValueError) as info:
    st.subtrack(**kwargs)
  msg = str(info.value)
  assert name in msg, msg
  assert accepted in msg, msg


@pytest.mark.parametrize("kwargs", [
    dict(b1=0.0, b2=0.0), dict(eps=0.0), dict(step_size=0.0),
    dict(norm_growth_limit=1.0), dict(rank=1, update_interval=1),
    dict(scale=1e-6), dict(rank=np.int64(3)),
], ids=str)
def test_boundary_values_are_accepted(kwargs):
  kwargs = {"rank": RANK, **kwargs}
  tx = st.subtrack(**kwargs)
  assert callable(tx.update)


def test_subtrack_adamw_validates_through():
  with pytest.raises(ValueError, match="rank"):
    st.subtrack_adamw(1e-3, rank=0)


@pytest.mark.parametrize("dims,params,path", [
    # one spec for every matrix leaf: a 2-D leaf has no axis 2
    (st.SubTrackDimensionNumbers(0, 2),
     {"ok": jnp.zeros((2, 8, 9)), "bad": jnp.zeros((8, 9))}, "['bad']"),
    # a pytree of specs, nested path
    ({"enc": {"q": st.SubTrackDimensionNumbers(0, (1, 3))}},
     {"enc": {"q": jnp.zeros((8, 2, 4))}}, "['enc']['q']"),
    # negative axis out of range
    ({"a": st.SubTrackDimensionNumbers(-3, -1), "b": None},
     {"a": jnp.zeros((8, 9)), "b": jnp.zeros((3,))}, "['a']"),
    # a spec for a vector leaf
    ({"v": st.SubTrackDimensionNumbers(0, 1)}, {"v": jnp.zeros((9,))},
     "['v']"),
    # a callable returning specs
    (lambda p: {"x": st.SubTrackDimensionNumbers(5, 0)},
     {"x": jnp.zeros((8, 9))}, "['x']"),
    # reduction and output axes overlap
    ({"o": st.SubTrackDimensionNumbers((0, 1), (1, 2))},
     {"o": jnp.zeros((4, 5, 6))}, "['o']"),
], ids=["shared-spec", "pytree", "negative", "vector", "callable", "overlap"])
def test_init_error_names_leaf_path_for_missing_axis(dims, params, path):
  tx = st.subtrack(RANK, dimension_numbers=dims)
  with pytest.raises(ValueError) as info:
    tx.init(params)
  msg = str(info.value)
  assert path in msg, msg
  assert "axis" in msg, msg


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_integer_and_bool_leaves_are_an_error_naming_the_path(dtype):
  params = {"w": jnp.zeros((16, 32)), "tbl": {"ids": jnp.zeros((16, 32),
                                                               dtype)}}
  with pytest.raises(TypeError) as info:
    st.subtrack(RANK).init(params)
  msg = str(info.value)
  assert "['tbl']['ids']" in msg, msg
  assert "optax.masked" in msg, msg


def test_integer_leaves_work_when_masked_out():
  params = {"w": jnp.ones((16, 3)), "ids": jnp.zeros((16, 32), jnp.int32)}
  tx = optax.masked(st.subtrack(RANK), {"w": True, "ids": False})
  state = tx.init(params)
  grads = {"w": jnp.ones((16, 3)), "ids": jnp.zeros((16, 32), jnp.int32)}
  updates, _ = jax.jit(tx.update)(grads, state)
  assert updates["ids"].dtype == jnp.int32
  assert _all_finite(updates["w"])


def test_complex_leaves_are_exactly_dense_adam():
  # A (16, 32) float leaf would be projected at rank 4; complex is dense.
  params = {"c": jnp.zeros((16, 32), jnp.complex64)}
  tx = st.subtrack(RANK, 1)
  ref = optax.scale_by_adam()
  state, ref_state = tx.init(params), ref.init(params)
  assert isinstance(state.basis["c"], optax.MaskedNode)
  assert isinstance(state.recovery_norm["c"], optax.MaskedNode)
  assert state.mu["c"].shape == (16, 32) and state.mu["c"].dtype == jnp.complex64
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  for i in range(3):
    k1, k2 = jax.random.split(jax.random.key(i))
    g = {"c": (jax.random.normal(k1, (16, 32))
               + 1j * jax.random.normal(k2, (16, 32))).astype(jnp.complex64)}
    u, state = update(g, state)
    ru, ref_state = ref_update(g, ref_state)
    assert u["c"].dtype == jnp.complex64
    np.testing.assert_array_equal(u["c"], ru["c"])
    np.testing.assert_array_equal(state.mu["c"], ref_state.mu["c"])
    np.testing.assert_array_equal(state.nu["c"], ref_state.nu["c"])


# --------------------------------------------------------------------------
# 2. Non-finite and zero gradients.
# --------------------------------------------------------------------------


def _run(mode, grads_seq, wrap_finite=False):
  tx, update = _tx(mode, wrap_finite)
  state = tx.init(_params())
  outs = []
  for g in grads_seq:
    u, state = update(g, state)
    outs.append((u, state))
  return outs


def _basis(state):
  inner = getattr(state, "inner_state", state)
  return inner.basis


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_gradient_at_refresh_keeps_basis(mode):
  good = [_grads(0), _grads(1)]
  before = _run(mode, good)[-1][1]
  for value in (jnp.nan, jnp.inf, -jnp.inf):
    # count == 2 is a refresh step for every mode.
    _, state = _run(mode, good + [_poison(_grads(2), value)])[-1]
    np.testing.assert_array_equal(state.basis["k"], before.basis["k"])
    assert _all_finite(state.basis)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "frozen"])
def test_nonfinite_batch_slice_keeps_only_its_basis(mode):
  good = [_grads(0), _grads(1)]
  before = _run(mode, good)[-1][1].basis["k"]
  state = _run(mode, good + [_poison(_grads(2), jnp.nan, slice_index=1)])[-1][1]
  after = state.basis["k"]
  np.testing.assert_array_equal(after[1], before[1])
  for i in (0, 2):  # the finite slices did refresh
    assert not np.array_equal(after[i], before[i])
  assert _all_finite(after)
  assert _orth_err(after) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_gradient_at_first_step_gives_orthonormal_basis(mode):
  outs = _run(mode, [_poison(_grads(0), jnp.nan)])
  state = outs[0][1]
  assert _all_finite(state.basis)
  assert _orth_err(state.basis["k"]) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_basis_stays_finite_after_a_nonfinite_step(mode):
  # Without apply_if_finite the moments are poisoned (as in optax.adam), but
  # the basis is not: later refreshes use only the finite gradients.
  seq = [_grads(0), _poison(_grads(1), jnp.inf), _grads(2), _grads(3),
         _grads(4)]
  for _, state in _run(mode, seq):
    assert _all_finite(state.basis)
    assert _orth_err(state.basis["k"]) < 1e-5


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("bad_at", [0, 2])
def test_apply_if_finite_skips_bad_step_without_a_trace(bad_at):
  goods = [_grads(i) for i in range(4)]
  seq = list(goods)
  seq.insert(bad_at, _poison(_grads(9), jnp.nan))
  ref = _run("grassmann", goods, wrap_finite=True)
  got = _run("grassmann", seq, wrap_finite=True)
  skipped_u, skipped_state = got[bad_at]
  assert not bool(skipped_state.last_finite)
  for leaf in jax.tree.leaves(skipped_u):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  if bad_at > 0:
    _assert_trees_equal(skipped_state.inner_state, got[bad_at - 1][1].inner_state)
  got = got[:bad_at] + got[bad_at + 1:]
  for (u, s), (ru, rs) in zip(got, ref):
    assert _all_finite(u)
    _assert_trees_equal(u, ru)
    _assert_trees_equal(s.inner_state, rs.inner_state)


@pytest.mark.parametrize("mode", MODES)
def test_zero_gradients_give_finite_updates_and_orthonormal_basis(mode):
  zeros = jax.tree.map(jnp.zeros_like, _params())
  # zero on the first step and on the refresh steps 2 and 4
  seq = [zeros, _grads(1), zeros, _grads(3), zeros, _grads(5)]
  for u, state in _run(mode, seq):
    assert _all_finite(u)
    assert _all_finite(state)
    assert _orth_err(state.basis["k"]) < 1e-5


def _projector(s):
  s = np.asarray(s, np.float64)
  return s @ np.swapaxes(s, -1, -2)


@pytest.mark.parametrize("scale", [1e-20, 1e18])
def test_first_basis_is_independent_of_gradient_scale(scale):
  # Finite but extreme gradients: ||X||_F over- or underflows in float32.
  g = _grads(0)
  ref = _run("frozen", [g])[0][1].basis
  got = _run("frozen", [jax.tree.map(lambda x: scale * x, g)])[0][1].basis
  diff = np.max(np.abs(_projector(got["k"]) - _projector(ref["k"])))
  assert diff < 1e-4, diff


_jit_grassmann_step = jax.jit(st.grassmann_step)


@pytest.mark.parametrize("scale", [1e-20, 1e18])
def test_grassmann_step_is_independent_of_gradient_scale(scale):
  x = jax.random.normal(jax.random.key(0), (32, 48))
  s0 = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (32, 4)))[0]
  step = _jit_grassmann_step
  s_ref, theta_ref = step(s0, x, 0.5)
  s_got, theta_got = step(s0, x * scale, 0.5)
  assert float(theta_ref) > 0
  np.testing.assert_allclose(theta_got, theta_ref, rtol=1e-4)
  np.testing.assert_allclose(s_got, s_ref, atol=1e-5)


# --------------------------------------------------------------------------
# 3. Long runs: 10^4 tracking updates stay orthonormal.
# --------------------------------------------------------------------------

LONG_D, LONG_BIG_D, LONG_R, LONG_STEPS = 64, 48, 8, 10_000


def _long_run_grad(pools, i):
  """A fresh Gaussian gradient for step ``i``, cheaply.

  Sum of two pools of sizes 97 and 89 indexed cyclically: the pair repeats
  only after 8633 steps. (Drawing with ``jax.random`` inside the loop costs
  several times more than the update itself at -O0.)
  """
  a, b = pools
  return a[i % a.shape[0]] + b[i % b.shape[0]]


def _pools(seed):
  ka, kb = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(ka, (97, LONG_D, LONG_BIG_D)),
          jax.random.normal(kb, (89, LONG_D, LONG_BIG_D)))


def _jit_orth_err(s):
  s = s.astype(jnp.float32)
  gram = jnp.matmul(jnp.swapaxes(s, -1, -2), s,
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.max(jnp.abs(gram - jnp.eye(s.shape[-1], dtype=jnp.float32)))


@pytest.mark.parametrize("step_size,normalize,grad_scale", [
    (0.5, True, 1.0), (2.0, False, 30.0)], ids=["normalized", "raw"])
def test_grassmann_step_10k_updates_stay_orthonormal(step_size, normalize,
                                                     grad_scale):
  @jax.jit
  def run(pools):
    s0 = jnp.eye(LONG_D, LONG_R, dtype=jnp.float32)

    def body(i, carry):
      s, worst, moved = carry
      x = grad_scale * _long_run_grad(pools, i)
      s, theta = st.grassmann_step(s, x, step_size, normalize)
      return s, jnp.maximum(worst, _jit_orth_err(s)), moved + (theta > 0)

    return jax.lax.fori_loop(0, LONG_STEPS, body, (s0, 0.0, 0))

  s, worst, moved = run(_pools(0))
  assert int(moved) == LONG_STEPS  # every step actually rotated the basis
  assert float(worst) < 1e-4
  assert _orth_err(s) < 1e-4


@pytest.mark.parametrize("basis_dtype,bound", [
    (jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
def test_transform_10k_refreshes_stay_orthonormal(basis_dtype, bound):
  tx = st.subtrack(LONG_R, 1, basis_dtype=basis_dtype)
  params = {"w": jnp.zeros((LONG_D, LONG_BIG_D))}

  @jax.jit
  def run(pools):
    state = tx.init(params)

    def body(carry, i):
      state, worst = carry
      g = {"w": _long_run_grad(pools, i)}
      u, state = tx.update(g, state)
      ok = jnp.all(jnp.isfinite(u["w"]))
      return (state, jnp.maximum(worst, _jit_orth_err(state.basis["w"]))), ok

    (state, worst), ok = jax.lax.scan(body, (state, 0.0),
                                      jnp.arange(LONG_STEPS))
    return state, worst, ok

  state, worst, ok = run(_pools(1))
  assert state.basis["w"].dtype == basis_dtype
  assert int(state.count) == LONG_STEPS
  assert bool(jnp.all(ok))
  assert float(worst) < bound
  assert _orth_err(state.basis["w"]) < bound


# --------------------------------------------------------------------------
# 5. Determinism.
# --------------------------------------------------------------------------


def _steps(tx, update, grads_seq, params):
  state = tx.init(params)
  outs = []
  for g in grads_seq:
    u, state = update(g, state)
    outs.append((u, state))
  return outs


def test_same_inputs_same_outputs_across_calls_and_instances():
  seq = [_grads(i) for i in range(3)]
  tx_a, upd_a = _tx("grassmann")
  first = _steps(tx_a, upd_a, seq, _params())
  again = _steps(tx_a, upd_a, seq, _params())
  tx_b = st.subtrack(RANK, INTERVAL)  # a freshly built transform
  fresh = _steps(tx_b, jax.jit(tx_b.update), seq, _params())
  for (u1, s1), (u2, s2), (u3, s3) in zip(first, again, fresh):
    _assert_trees_equal(u1, u2)
    _assert_trees_equal(s1, s2)
    _assert_trees_equal(u1, u3)
    _assert_trees_equal(s1, s3)


def _random_bases(seed, params, grads):
  """Bases after the refresh at count 2, from a freshly built transform."""
  tx = st.subtrack(RANK, INTERVAL, subspace_update="random", seed=seed)
  return _steps(tx, jax.jit(tx.update), [grads] * 3, params)[-1][1].basis


def test_random_mode_reproducible_and_keyed_by_seed_and_path():
  g = _grads(0)["k"]
  params = {"a": jnp.zeros((20, 16)), "b": jnp.zeros((20, 16))}
  grads = {"a": g[0], "b": g[0]}  # identical shapes and gradients
  base = _random_bases(7, params, grads)
  # A fresh transform with the same seed, on a tree with one more leaf that
  # sorts first: the existing leaves get the same bases (reproducible and
  # keyed by path, not by position).
  more = _random_bases(7, {"A": jnp.zeros((12, 10)), "a": params["a"]},
                       {"A": g[1, :12, :10], "a": grads["a"]})
  np.testing.assert_allclose(more["a"], base["a"], rtol=0, atol=1e-6)
  other_seed = _random_bases(8, {"a": params["a"]}, {"a": grads["a"]})
  assert np.max(np.abs(_projector(base["a"])
                       - _projector(other_seed["a"]))) > 0.1
  # same shape, same gradient, different path: different random bases
  assert np.max(np.abs(_projector(base["a"]) - _projector(base["b"]))) > 0.1
  for b in (base["a"], base["b"], more["A"], other_seed["a"]):
    assert _orth_err(b) < 1e-5
  # the refreshed basis is really new, not the first-step SVD basis (the
  # frozen mode keeps it; its leaf "k" has slices of the same shape)
  tx, update = _tx("frozen")
  first = _steps(tx, update, [dict(_grads(1), k=g)], _params())
  svd_basis = first[0][1].basis["k"][0]
  assert np.max(np.abs(_projector(base["a"]) - _projector(svd_basis))) > 0.1
