"""Unit tests of the pieces: linear algebra, tracking, transport, memory."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st
from subtrack_optax import _linalg
from subtrack_optax import _equations

jit_orth = jax.jit(_linalg.householder_orthonormalize)
jit_eig = jax.jit(_linalg.psd_eig)
jit_top_eig = jax.jit(_linalg.top_eigvec_psd)
jit_svd = jax.jit(_linalg.top_left_singular_vectors, static_argnums=1)
jit_track = jax.jit(st.grassmann_step, static_argnums=3)


def _orth_err(s):
  s = np.asarray(s, np.float64)
  r = s.shape[-1]
  return np.abs(np.swapaxes(s, -1, -2) @ s - np.eye(r)).max()


def _separated(rng, m, n, ratio=0.75):
  k = min(m, n)
  u, _ = np.linalg.qr(rng.normal(size=(m, k)))
  v, _ = np.linalg.qr(rng.normal(size=(n, k)))
  return (u * ratio ** np.arange(k)) @ v.T, u


def test_householder_orthonormal_and_span():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(3, 24, 6)).astype(np.float32)
  q = np.asarray(jit_orth(y), np.float64)
  assert _orth_err(q) < 1e-5
  np.testing.assert_allclose(q @ np.swapaxes(q, -1, -2) @ y, y, atol=1e-5)


@pytest.mark.parametrize("kind", ["zero", "rank1", "duplicate"])
def test_householder_degenerate_inputs_stay_orthonormal(kind):
  rng = np.random.default_rng(1)
  y = np.zeros((24, 6), np.float32)
  if kind == "rank1":
    y = np.outer(rng.normal(size=24), rng.normal(size=6)).astype(np.float32)
  if kind == "duplicate":
    c = rng.normal(size=(24, 1))
    y = np.repeat(c, 6, axis=1).astype(np.float32)
  q = jit_orth(y)
  assert np.all(np.isfinite(q))
  assert _orth_err(q) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 5, 8, 13])
def test_psd_eig_matches_numpy(k):
  rng = np.random.default_rng(k)
  g = rng.normal(size=(3, k, k + 2))
  a = g @ np.swapaxes(g, -1, -2)
  a /= np.abs(a).max()
  w, v = jit_eig(a.astype(np.float32))
  np.testing.assert_allclose(w, np.linalg.eigvalsh(a)[..., ::-1], atol=1e-5)
  v = np.asarray(v, np.float64)
  assert _orth_err(v) < 1e-5
  np.testing.assert_allclose(v @ (np.asarray(w)[..., None] * np.swapaxes(v, -1, -2)), a,
                             atol=1e-5)


@pytest.mark.parametrize("kind", ["zero", "rank_deficient", "repeated"])
def test_psd_eig_degenerate(kind):
  """Zero, rank-deficient and repeated-eigenvalue inputs: orthonormal
  eigenvectors that reconstruct the matrix, eigenvalues descending."""
  rng = np.random.default_rng(5)
  k = 12
  if kind == "zero":
    a = np.zeros((k, k))
  elif kind == "rank_deficient":
    g = rng.normal(size=(k, 3))
    a = g @ g.T
  else:
    u, _ = np.linalg.qr(rng.normal(size=(k, k)))
    a = (u * np.repeat([3.0, 1.0, 0.5], 4)) @ u.T
  w, v = jit_eig(a.astype(np.float32))
  w, v = np.asarray(w, np.float64), np.asarray(v, np.float64)
  assert np.all(np.diff(w) <= 1e-6)
  assert _orth_err(v) < 1e-5
  np.testing.assert_allclose((v * w) @ v.T, a, atol=1e-5 * max(1, np.abs(a).max()))


@pytest.mark.parametrize("k", [64, 256])
def test_psd_eig_top_vectors_of_a_decaying_spectrum(k):
  """The Rayleigh-Ritz matrix of a gradient: eigenvalues decaying by 0.75
  per index (SPEC section 3's test spectrum) down to float32 resolution;
  the top 32 eigenvectors to float32 accuracy."""
  rng = np.random.default_rng(k)
  u, _ = np.linalg.qr(rng.normal(size=(k, k)))
  a = (u * 0.75 ** np.arange(k)) @ u.T
  w, v = jit_eig(a.astype(np.float32))
  np.testing.assert_allclose(
      np.abs(np.sum(np.asarray(v[:, :32], np.float64) * u[:, :32], 0)), 1.0,
      atol=2e-5)
  np.testing.assert_allclose(w[:32], 0.75 ** np.arange(32), atol=1e-5)


def test_top_eigvec_psd():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(4, 6, 6))
  g = g @ np.swapaxes(g, -1, -2)
  v = np.asarray(jit_top_eig(g.astype(np.float32)), np.float64)
  _, vecs = np.linalg.eigh(g)
  np.testing.assert_allclose(np.abs(np.sum(v * vecs[..., -1], -1)), 1.0,
                             atol=1e-5)
  # Zero input: a unit vector, not NaN.
  z = np.asarray(jit_top_eig(np.zeros((6, 6), np.float32)))
  np.testing.assert_allclose(np.linalg.norm(z), 1.0, rtol=1e-6)


@pytest.mark.parametrize("rank,shape", [(1, (20, 30)), (2, (30, 20)),
                                        (4, (24, 40)), (8, (32, 48)),
                                        (5, (10, 40))])
def test_top_left_singular_vectors_match_dense_svd(rank, shape):
  """SPEC section 3: float32 accuracy when singular values separate by 0.75."""
  rng = np.random.default_rng(rank)
  x, u = _separated(rng, *shape)
  s = np.asarray(jit_svd(x.astype(np.float32), rank), np.float64)
  # Columns in descending order, each equal to the SVD's up to sign.
  np.testing.assert_allclose(np.abs(np.sum(s * u[:, :rank], 0)), 1.0,
                             atol=2e-5)
  assert _orth_err(s) < 1e-5


def test_top_left_singular_vectors_batched_and_degenerate():
  rng = np.random.default_rng(3)
  x = np.stack([_separated(rng, 16, 24)[0], np.zeros((16, 24)),
                np.outer(rng.normal(size=16), rng.normal(size=24))])
  s = np.asarray(jit_svd(x.astype(np.float32), 4))
  assert s.shape == (3, 16, 4)
  assert np.all(np.isfinite(s))
  assert _orth_err(s) < 1e-5


def _tracking_problem(seed=4, d=32, big_d=48, r=4):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(d, r)))
  x = u @ rng.normal(size=(r, big_d)) + 0.01 * rng.normal(size=(d, big_d))
  s, _ = np.linalg.qr(rng.normal(size=(d, r)))
  return x.astype(np.float32), s.astype(np.float32), u


def _proj_err(s, x):
  s = np.asarray(s, np.float64)
  return np.linalg.norm(x - s @ (s.T @ x)) ** 2


def test_tracking_keeps_orthonormality():
  x, s, _ = _tracking_problem()
  rng = np.random.default_rng(5)
  for i in range(20):
    s, theta = jit_track(s, x + rng.normal(size=x.shape).astype(np.float32),
                         0.5, True)
    assert float(theta) > 0
  assert _orth_err(s) < 1e-5


@pytest.mark.parametrize("normalize,step", [(True, 0.05), (False, 0.005)])
def test_tracking_small_step_decreases_projection_error(normalize, step):
  x, s, _ = _tracking_problem(seed=6)
  s_new, theta = jit_track(s, x, step, normalize)
  assert 0 < float(theta) < 0.5
  assert _proj_err(s_new, x) < _proj_err(s, x)


def test_tracking_recovers_planted_subspace():
  x, s, u = _tracking_problem(seed=7)
  track = jax.jit(lambda s: jax.lax.fori_loop(
      0, 300, lambda _, s: st.grassmann_step(s, x, 0.5)[0], s))
  s = np.asarray(track(s), np.float64)
  # Principal angles between span(S) and the planted span are ~0.
  cosines = np.linalg.svd(u.T @ s, compute_uv=False)
  assert cosines.min() > 0.999


def test_tracking_geodesic_angle_matches_formula():
  """A step rotates span(S) by exactly theta = step * sigma (one plane)."""
  x, s, _ = _tracking_problem(seed=8)
  s_new, theta = jit_track(s, x, 0.3, True)
  cosines = np.linalg.svd(np.asarray(s, np.float64).T @ np.asarray(s_new),
                          compute_uv=False)
  np.testing.assert_allclose(np.arccos(np.clip(cosines.min(), -1, 1)),
                             float(theta), atol=2e-3)
  np.testing.assert_allclose(np.sort(cosines)[1:], 1.0, atol=1e-5)


def test_transport_with_identity_leaves_moments_unchanged():
  rng = np.random.default_rng(9)
  s, _ = np.linalg.qr(rng.normal(size=(16, 4)))
  s = jnp.asarray(s, jnp.float32)
  m = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  v = jnp.asarray(rng.uniform(0.5, 1.5, size=(4, 10)), jnp.float32) + m * m
  m2, v2 = jax.jit(_equations.transport_moments)(s, s, m, v)
  np.testing.assert_allclose(m2, m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v2, v, rtol=1e-5, atol=1e-6)


def test_transport_permutation_permutes_moments():
  rng = np.random.default_rng(10)
  s, _ = np.linalg.qr(rng.normal(size=(16, 4)))
  perm = np.array([2, 0, 3, 1])
  m = rng.normal(size=(4, 10)).astype(np.float32)
  v = (rng.uniform(size=(4, 10)) + m * m).astype(np.float32)
  m2, v2 = _equations.transport_moments(jnp.asarray(s[:, perm], jnp.float32),
                                        jnp.asarray(s, jnp.float32), m, v)
  np.testing.assert_allclose(m2, m[perm], atol=1e-5)
  np.testing.assert_allclose(v2, v[perm], atol=1e-5)


def _state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize("basis_dtype,mu_dtype,param_dtype,side", [
    (jnp.float32, None, jnp.float32, "small"),
    (jnp.bfloat16, jnp.bfloat16, jnp.float32, "large"),
    (jnp.float32, None, jnp.bfloat16, "small"),
])
def test_state_bytes_equal_spec_formula(basis_dtype, mu_dtype, param_dtype,
                                        side):
  r = 4
  params = {"wide": jnp.zeros((12, 40), param_dtype),
            "tall": jnp.zeros((40, 12), param_dtype),
            "scan": jnp.zeros((3, 16, 24), param_dtype),
            "bias": jnp.zeros((40,), param_dtype),
            "thin": jnp.zeros((4, 50), param_dtype)}
  tx = st.subtrack(r, basis_dtype=basis_dtype, mu_dtype=mu_dtype,
                   basis_side=side)
  state = jax.eval_shape(tx.init, params)
  pb = jnp.dtype(param_dtype).itemsize
  bb = jnp.dtype(basis_dtype).itemsize
  mb = jnp.dtype(mu_dtype or param_dtype).itemsize

  def matrix(m, n):
    d, big_d = (min(m, n), max(m, n)) if side == "small" else (max(m, n),
                                                              min(m, n))
    return d * r * bb + r * big_d * (mb + pb) + 4

  expected = (4 + matrix(12, 40) + matrix(40, 12) + 3 * matrix(16, 24)
              + 40 * (mb + pb) + 200 * (mb + pb))
  assert _state_bytes(state) == expected
  adam = _state_bytes(jax.eval_shape(optax.scale_by_adam().init, params))
  assert _state_bytes(state) < adam


# ---- the tracking step's shortcuts against the plain formulas -------------

from subtrack_optax import _tracking  # noqa: E402


@pytest.mark.parametrize("gap", [0.5, 0.999, 1.0 - 1e-6])
def test_top_eigvec_psd_small_gaps(gap):
  # The squarings stop once M is a fixed point; with a small gap that must
  # still be the top eigenvector (or, at a numerical tie, a vector whose
  # Rayleigh quotient is the top eigenvalue).
  rng = np.random.default_rng(11)
  q, _ = np.linalg.qr(rng.normal(size=(3, 24, 24)))
  w = np.concatenate([[1.0, gap], rng.uniform(0.0, 0.6, 22)])
  g = (q * w) @ np.swapaxes(q, -1, -2)
  v = np.asarray(jit_top_eig(g.astype(np.float32)), np.float64)
  rayleigh = np.einsum("bi,bij,bj->b", v, g, v)
  np.testing.assert_allclose(rayleigh, 1.0, atol=2e-6)
  if gap <= 0.999:
    np.testing.assert_allclose(np.abs(np.sum(v * q[..., 0], -1)), 1.0,
                               atol=1e-4)


def _tracking_case(seed=12, batch=(2,), d=24, big_d=40, r=5):
  rng = np.random.default_rng(seed)
  s, _ = np.linalg.qr(rng.normal(size=batch + (d, r)))
  x = rng.normal(size=batch + (d, big_d))
  return jnp.asarray(s, jnp.float32), jnp.asarray(x, jnp.float32)


@jax.jit
def _multi_all_ways(s, x):
  """The tracking step plain, from given projections, and on X^T."""
  plain = _tracking.grassmann_step_multi([s], [x], 0.7)
  p = jnp.swapaxes(s, -1, -2) @ x
  fast = _tracking.grassmann_step_multi([s], [x], 0.7,
                                        projections=[p])
  xt = jnp.swapaxes(x, -1, -2)
  trans = _tracking.grassmann_step_multi([s], [xt], 0.7,
                                         projections=[p], transposed=[True])
  return plain, fast, trans


def test_tracking_from_projections_and_transposed_input_agree():
  s, x = _tracking_case()
  plain, fast, trans = _multi_all_ways(s, x)
  for out in (fast, trans):
    for a, b in zip(plain[:3], out[:3]):
      np.testing.assert_allclose(a[0], b[0], atol=2e-5)
  # The projections returned are those on the new basis.
  s_new = np.asarray(plain[0][0], np.float64)
  direct = np.swapaxes(s_new, -1, -2) @ np.asarray(x, np.float64)
  for out in (fast, trans):
    np.testing.assert_allclose(out[3][0], direct, atol=5e-5)
  assert float(np.min(plain[1][0])) > 0.0   # it did rotate


def test_rank1_transport_matches_change_of_basis():
  s, x = _tracking_case(seed=13)
  s_new, theta, axis, _ = _tracking.grassmann_step_multi([s], [x], 1.2)
  rng = np.random.default_rng(14)
  m = jnp.asarray(rng.normal(size=(2, 5, 40)), jnp.float32)
  v = m * m + jnp.asarray(rng.uniform(0.1, 1.0, size=(2, 5, 40)), jnp.float32)
  general = jax.jit(_equations.transport_moments)(s_new[0], s, m, v)
  rank1 = jax.jit(
      lambda *a: _equations.transport_moments(*a[:4], rotation=a[4:]))(
      s_new[0], s, m, v, axis[0], theta[0])
  np.testing.assert_allclose(rank1[0], general[0], atol=2e-5)
  np.testing.assert_allclose(rank1[1], general[1], rtol=1e-4, atol=2e-5)
  # theta = 0 (a kept basis) leaves the moments exactly as they were.
  same = _equations.transport_moments(s, s, m, v,
                                      rotation=(axis[0], 0.0 * theta[0]))
  np.testing.assert_array_equal(same[0], m)
  np.testing.assert_array_equal(same[1], v)


def test_reorthonormalize_if_needed():
  s, _ = _tracking_case(seed=15)
  fix = jax.jit(_linalg.reorthonormalize_if_needed)
  # Orthonormal to rounding: returned as it is, bit for bit.
  kept = fix([s, s[:1]])
  np.testing.assert_array_equal(kept[0], s)
  np.testing.assert_array_equal(kept[1], s[:1])
  # One drifted basis: the whole list gets the Newton-Schulz step.
  drifted = s * 1.001
  fixed = fix([s, drifted])
  assert _orth_err(drifted) > 1e-3
  assert _orth_err(fixed[1]) < 1e-5 and _orth_err(fixed[0]) < 1e-6


@pytest.mark.parametrize("basis_dtype,tol", [(jnp.float32, 2e-5),
                                             (jnp.bfloat16, 2e-5)])
def test_tracking_step_projects_on_the_stored_basis(basis_dtype, tol):
  # With b1 = 0 the first moment after a step is that step's P exactly, so
  # the state shows which P the step used: after a tracking step it must be
  # the stored (new) basis times X, also when the basis is stored in
  # bfloat16 and so differs from the float32 rotation by its rounding.
  tx = st.subtrack(3, update_interval=2, b1=0.0, transport_moments=False,
                   recovery_scaling=False, basis_dtype=basis_dtype)
  rng = np.random.default_rng(16)
  params = {"w": jnp.zeros((10, 14))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):                     # first basis, regular, tracking
    g = {"w": jnp.asarray(rng.normal(size=(10, 14)), jnp.float32)}
    _, new_state = update(g, state, params)
    moved = not np.array_equal(np.asarray(new_state.basis["w"], np.float32),
                               np.asarray(state.basis["w"], np.float32))
    state = new_state
  assert moved                           # the last step did rotate
  s = np.asarray(state.basis["w"], np.float64)
  p = s.T @ np.asarray(g["w"], np.float64)
  np.testing.assert_allclose(state.mu["w"], p, atol=tol * np.abs(p).max())


def _products_with(jaxpr, shape) -> list:
  """The other operand's shape of every ``dot_general`` in ``jaxpr`` (sub-
  jaxprs included) that has an operand of ``shape`` or its transpose."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes = [tuple(v.aval.shape) for v in eqn.invars]
      for i, o in enumerate(shapes):
        if o in (shape, shape[::-1]):
          out.append(shapes[1 - i])
          break
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _products_with(sub, shape)
  return out


@pytest.mark.parametrize("shape", [(10, 14), (14, 10)])
def test_tracking_reuses_the_projection(shape):
  """Given ``P = S^T X`` (the regular step's projection, taken first), a
  geodesic step reads the gradient through one ``d x D x r`` product
  (``Y = X_n (X_n^T S)`` from ``P``) and one vector product (``w^T X``, for
  ``S'^T X = P + v w^T X``): without ``P`` it takes two ``d x D x r``
  products, and the regular step a third. The projection it returns is
  the new basis's."""
  from subtrack_optax import _frame, _plans, _step   # pylint: disable=g-import-not-at-top
  import types   # pylint: disable=g-import-not-at-top
  r = 3
  plan = _plans.resolve_plans({"w": jnp.zeros(shape)}, None, r, "small")["w"]
  frame = _frame.Frame(plan)
  cfg = types.SimpleNamespace(normalize_tracking=True, step_size=0.7)
  rng = np.random.default_rng(5)
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  s = _linalg.householder_orthonormalize(
      jnp.asarray(rng.normal(size=(10, r)), jnp.float32))

  def track(g, s, with_p):
    ops = _step.matrix_ops(frame, g)
    p = ops.project(s) if with_p else None
    return _step._track_one(cfg, ops, None, None, s, p)   # pylint: disable=protected-access

  wide = lambda o: r in o and len(o) == 2
  with_p = _products_with(jax.make_jaxpr(lambda g, s: track(g, s, True))(
      g, s).jaxpr, shape)
  without = _products_with(jax.make_jaxpr(lambda g, s: track(g, s, False))(
      g, s).jaxpr, shape)
  # with P: the projection itself, Y, and w^T X (a vector)
  assert sorted(map(wide, with_p)) == [False, True, True], with_p
  assert sorted(map(wide, without)) == [True, True], without
  item = jax.jit(lambda g, s: track(g, s, True))(g, s)
  plain = jax.jit(lambda g, s: track(g, s, False))(g, s)
  assert float(item.theta) > 0
  np.testing.assert_allclose(item.basis, plain.basis, atol=1e-6)
  x = np.asarray(frame.to_canonical(g), np.float64)
  np.testing.assert_allclose(
      item.projection, np.asarray(item.basis, np.float64).T @ x,
      atol=1e-5 * np.abs(x).max())


def test_jacobi_holds_its_columns_as_rows():
  """The one-sided Jacobi rotates the columns of the stacked ``[A V; V]``
  held transposed (``k x 2k``): each column is a contiguous row, its norms
  reduce along the minor axis and the round's permutation moves whole rows
  (at ``k = 256`` a round took 77 us column-wise and 53 us row-wise on
  XLA:CPU, the first basis 241 -> 182 ms at ``512 x 1376``, rank 128)."""
  text = jax.jit(_linalg.psd_eig).lower(jnp.eye(8)).as_text()
  carried = [re.findall(r"tensor<(\d+)x(\d+)xf32>", line.split(":", 1)[1])
             for line in text.splitlines() if "stablehlo.while" in line]
  assert len(carried) == 2, carried            # the sweeps and the rounds
  assert all(c == [("8", "16")] for c in carried), carried
