"""Property-based tests (hypothesis) over shapes, ranks, axes and dtypes.

Issue 6, item 6. Examples are derandomized (stable in CI) and few: every
new shape compiles the update once. The state-size property needs no
compilation (``jax.eval_shape``) and runs more examples.
"""

import math

import hypothesis
from hypothesis import strategies as hst
import jax
import jax.numpy as jnp
import numpy as np

import subtrack_optax as st

DTYPES = (jnp.float32, jnp.bfloat16)
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(hypothesis.HealthCheck))


@hst.composite
def matrix_leaves(draw, max_ndim=4, max_size=600):
  """(shape, dimension numbers) with random reduction/output/batch axes.

  Axes are written as ints or tuples, positive or negative.
  """
  ndim = draw(hst.integers(2, max_ndim))
  shape = tuple(draw(hst.lists(hst.integers(1, 9), min_size=ndim,
                               max_size=ndim)))
  hypothesis.assume(math.prod(shape) <= max_size)
  perm = draw(hst.permutations(range(ndim)))
  n_red = draw(hst.integers(1, ndim - 1))
  n_out = draw(hst.integers(1, ndim - n_red))
  red, out = perm[:n_red], perm[n_red:n_red + n_out]

  def write(axes):
    axes = [a - ndim if draw(hst.booleans()) else a for a in axes]
    return axes[0] if len(axes) == 1 and draw(hst.booleans()) else tuple(axes)

  return shape, st.SubTrackDimensionNumbers(write(red), write(out))


def _norm_axes(spec, ndim):
  spec = (spec,) if isinstance(spec, int) else spec
  return tuple(a % ndim for a in spec)


def _expected_bytes(shape, dtype, spec, rank, basis_side, basis_dtype,
                    mu_dtype):
  """The spec's state-size formula (SPEC.md section 4), for one leaf."""
  p_bytes = jnp.dtype(dtype).itemsize
  mu_bytes = jnp.dtype(mu_dtype or dtype).itemsize
  size = math.prod(shape)
  dense = size * (mu_bytes + p_bytes)
  if spec is None:
    return dense
  red = _norm_axes(spec.reduction_axis, len(shape))
  out = _norm_axes(spec.output_axis, len(shape))
  m = math.prod(shape[a] for a in red)
  n = math.prod(shape[a] for a in out)
  batch = size // (m * n)
  if min(m, n) <= rank:
    return dense
  d = min(m, n) if basis_side == "small" else max(m, n)
  big_d = m * n // d
  per_matrix = (d * rank * jnp.dtype(basis_dtype).itemsize
                + rank * big_d * (mu_bytes + p_bytes) + 4)
  return batch * per_matrix


def _nbytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@hypothesis.settings(max_examples=60, **SETTINGS)
@hypothesis.given(
    leaves=hst.lists(matrix_leaves(max_size=4000), min_size=1, max_size=3),
    vector=hst.integers(1, 50),
    rank=hst.integers(1, 6),
    dtype=hst.sampled_from(DTYPES),
    basis_side=hst.sampled_from(("small", "large")),
    basis_dtype=hst.sampled_from(DTYPES),
    mu_dtype=hst.sampled_from((None, jnp.bfloat16, jnp.float32)),
    dense_first=hst.booleans(),
)
def test_state_bytes_equal_the_formula(leaves, vector, rank, dtype, basis_side,
                                       basis_dtype, mu_dtype, dense_first):
  params = {f"m{i}": jax.ShapeDtypeStruct(shape, dtype)
            for i, (shape, _) in enumerate(leaves)}
  params["v"] = jax.ShapeDtypeStruct((vector,), dtype)
  specs = {f"m{i}": spec for i, (_, spec) in enumerate(leaves)}
  specs["v"] = None
  if dense_first:  # one matrix leaf declared dense
    specs["m0"] = None
  tx = st.subtrack(rank, dimension_numbers=specs, basis_side=basis_side,
                   basis_dtype=basis_dtype, mu_dtype=mu_dtype)
  state = jax.eval_shape(tx.init, params)
  expected = 4 + sum(
      _expected_bytes(params[k].shape, dtype, specs[k], rank, basis_side,
                      basis_dtype, mu_dtype) for k in params)
  assert _nbytes(state) == expected
  assert state.count.dtype == jnp.int32 and state.count.shape == ()


def _finite(x):
  return bool(np.all(np.isfinite(np.asarray(x).astype(np.float32))))


def _orth_err(s):
  s = np.asarray(s).astype(np.float64)
  gram = np.swapaxes(s, -1, -2) @ s
  return float(np.max(np.abs(gram - np.eye(s.shape[-1]))))


@hypothesis.settings(max_examples=10, **SETTINGS)
@hypothesis.given(
    leaf=matrix_leaves(max_ndim=3, max_size=400),
    rank=hst.integers(1, 3),
    dtype=hst.sampled_from(DTYPES),
    basis_side=hst.sampled_from(("small", "large")),
    basis_dtype=hst.sampled_from(DTYPES),
    mode=hst.sampled_from(st.SUBSPACE_UPDATES),
    seed=hst.integers(0, 2**16),
)
def test_updates_finite_and_shapes_dtypes_preserved(leaf, rank, dtype,
                                                    basis_side, basis_dtype,
                                                    mode, seed):
  shape, spec = leaf
  params = {"x": jnp.zeros(shape, dtype), "v": jnp.zeros((5,), dtype)}
  tx = st.subtrack(rank, 2, subspace_update=mode, basis_side=basis_side,
                   basis_dtype=basis_dtype,
                   dimension_numbers={"x": spec, "v": None})
  update = jax.jit(tx.update)
  state = tx.init(params)
  init_struct = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  rng = np.random.default_rng(seed)  # host data: no per-shape eager kernels
  for _ in range(3):  # first basis, plain step, refresh
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32),
                              p.dtype), params)
    updates, state = update(grads, state, params)
    for name, p in params.items():
      u = updates[name]
      assert u.shape == p.shape and u.dtype == p.dtype, name
      assert _finite(u), name
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_struct
    assert all(_finite(x) for x in jax.tree.leaves(state))
  assert int(state.count) == 3
  basis = state.basis["x"]
  if isinstance(basis, jax.Array):  # projected
    bound = 1e-5 if basis_dtype == jnp.float32 else 2e-2
    assert _orth_err(basis) < bound
