"""Matmul-only linear algebra for low-rank bases.

Everything here is built from matrix products, elementwise operations,
reductions and small gathers/scatters. Nothing calls LAPACK (no ``eigh``,
``qr``, ``svd`` or ``cholesky``), so the same code batches well on GPU/TPU,
keeps a sharded ``d``/``D`` axis sharded (only ``k``-sized or ``k x k``
quantities are reduced across devices), and runs on simulated multi-device
CPU meshes, where XLA's collectives can deadlock around LAPACK custom calls.

The factorizations touch ``k x k`` matrices only (``k`` = rank, or an
oversampled rank ``<= 2 * rank``); ``d x k`` panels are processed by
Householder reflections applied as rank-1 updates.

References:
  Golub & Van Loan, *Matrix Computations* (4th ed.), Alg. 5.1.1
  (Householder vectors), sections 8.5.3 and 8.6.3 (parallel-order and
  one-sided Jacobi).
  Halko, Martinsson & Tropp 2011, *Finding structure with randomness*
  (subspace iteration with Rayleigh-Ritz).
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _sharding

__all__ = [
    "HIGHEST",
    "matmul",
    "householder_orthonormalize",
    "psd_eig",
    "top_eigvec_psd",
    "reorthonormalize_if_needed",
    "reorthonormalize",
    "gram_apply",
    "inverse_or_zero",
    "top_eigvecs_of_gram",
    "start_block",
    "top_left_singular_vectors",
    "safe_frobenius_norm",
    "flatten_batch",
    "subspace_iterations",
]

HIGHEST = jax.lax.Precision.HIGHEST


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """Batched ``a @ b`` in full float32 precision (no bf16/TF32 passes).

  Under explicit sharding, a contraction over an axis sharded in both
  operands gets the output sharding of its free axes (a reduction across
  devices of an output-sized piece).
  """
  return _sharding.sharded_matmul(a, b, precision=HIGHEST)


def _mT(a: jax.Array) -> jax.Array:
  return jnp.swapaxes(a, -1, -2)


def householder_orthonormalize(y: jax.Array) -> jax.Array:
  """Orthonormal basis ``Q`` (``..., d, k``) of the column span of ``y``.

  Householder QR: ``y = H_1 ... H_k R`` and ``Q = H_1 ... H_k [I_k; 0]``.
  ``Q`` has orthonormal columns for *any* input (rank-deficient, zero, ill
  conditioned), because it is a product of reflections applied to orthonormal
  columns; a zero column yields an identity reflection. When ``y`` has full
  column rank, ``span(Q[:, :j]) = span(y[:, :j])`` for every ``j``.

  Only rank-1 updates and reductions over ``d`` are used.

  Args:
    y: array of shape ``(..., d, k)`` with ``d >= k``.

  Returns:
    ``Q`` of the same shape and dtype float32.
  """
  y = y.astype(jnp.float32)
  d, k = y.shape[-2:]
  if k > d:
    raise ValueError(f"householder_orthonormalize needs d >= k, got {y.shape}")
  rows = jnp.arange(d)
  batch = y.shape[:-2]

  def reflect(v, a):
    # (I - 2 v v^T) a, for v unit (or zero), a (..., d, k).
    return a - 2.0 * v[..., :, None] * jnp.einsum(
        "...d,...dk->...k", v, a, precision=HIGHEST,
        out_sharding=_sharding.reduced_sharding(a, -2))[..., None, :]

  def body(j, carry):
    r, vs = carry
    x = jax.lax.dynamic_index_in_dim(r, j, axis=-1, keepdims=False)
    x = jnp.where(rows >= j, x, 0.0)
    # x_j as a masked sum: no dynamic slice of the (possibly sharded) d axis.
    xj = jnp.sum(jnp.where(rows == j, x, 0.0), axis=-1)
    norm_x = jnp.sqrt(jnp.sum(x * x, axis=-1))
    sign = jnp.where(xj >= 0, 1.0, -1.0)
    v = x + (sign * norm_x)[..., None] * (rows == j)
    norm_v = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
    v = jnp.where(norm_v > 0, v / jnp.where(norm_v > 0, norm_v, 1.0), 0.0)
    r = reflect(v, r)
    vs = jax.lax.dynamic_update_index_in_dim(vs, v, j, axis=-1)
    return r, vs

  vs = jnp.zeros_like(y)  # (batch..., d, k), with y's sharding
  _, vs = jax.lax.fori_loop(0, k, body, (y, vs))
  q = _sharding.like(jnp.broadcast_to(
      (rows[:, None] == jnp.arange(k)[None, :]).astype(jnp.float32),
      batch + (d, k)), y)

  def apply_back(i, q):
    j = k - 1 - i
    v = jax.lax.dynamic_index_in_dim(vs, j, axis=-1, keepdims=False)
    return reflect(v, q)

  return jax.lax.fori_loop(0, k, apply_back, q)


def psd_eig(a: jax.Array, sweeps: int = 16,
            tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  r"""Eigendecomposition of symmetric positive semidefinite ``k x k``
  matrices by one-sided (Hestenes) Jacobi.

  Plane rotations of *columns only*, ``A <- A J``, ``V <- V J``, until the
  columns of ``A V`` are orthogonal: then ``V^T A^2 V`` is diagonal, so the
  columns of ``V`` are eigenvectors of ``A^2``, hence of ``A`` (its
  eigenvalues are ``>= 0``, so equal squares mean equal eigenvalues), and
  the eigenvalues are the Rayleigh quotients :math:`w_i = v_i^T A v_i`.
  For a pair of columns ``(p, q)`` of ``A V`` with
  :math:`\alpha = \|b_p\|^2`, :math:`\beta = \|b_q\|^2`,
  :math:`\gamma = b_p^T b_q`:

  .. math::

     \zeta = \frac{\beta - \alpha}{2\gamma},\quad
     t = \frac{\mathrm{sign}(\zeta)}{|\zeta| + \sqrt{1 + \zeta^2}},\quad
     c = \frac{1}{\sqrt{1 + t^2}},\quad s = t c,\quad
     (b_p, b_q) \leftarrow (c\,b_p - s\,b_q,\ s\,b_p + c\,b_q).

  ``A V`` and ``V`` are stacked into one ``2k x k`` array whose columns are
  kept in round-robin *position* order (position ``i < k/2`` paired with
  ``k/2 + i``): a round is one elementwise combination of the two column
  halves and one fixed permutation of static slices; ``k - 1`` rounds make
  a sweep (every pair once), ``O(k^2)`` each. The array is held
  transposed, ``k x 2k``, so that a column is a contiguous row: its norms
  are reductions along the minor axis and the permutation moves whole rows
  (a round at ``k = 256`` took 77 us column-wise, 53 us row-wise, on
  XLA:CPU). Rotating columns only, a
  round is half the code of a two-sided Jacobi round (rows, then columns),
  and it compiles in about half the time. The sweeps stop, for the whole
  batch at once, after the first sweep in which no pair had
  :math:`|\gamma| > \mathrm{tol}\sqrt{\alpha_{max}\max(\alpha, \beta)}`
  (an off-diagonal entry of ``V^T A V`` below about ``tol ||A||``), or
  after ``sweeps`` sweeps. (A symmetric *indefinite* ``A`` gets its
  eigenvectors only where no two eigenvalues have the same magnitude.)

  Args:
    a: symmetric positive semidefinite array ``(..., k, k)``.
    sweeps: maximum number of sweeps.
    tol: the convergence threshold above.

  Returns:
    ``(w, v)``: eigenvalues ``(..., k)`` in descending order and the
    eigenvectors as columns of ``v`` (``a ~= v diag(w) v^T``).

  Example:
    >>> import jax.numpy as jnp
    >>> w, v = psd_eig(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> [round(float(x), 4) for x in w]
    [3.0, 1.0]

  References:
    Hestenes 1958, *Inversion of matrices by biorthogonalization*;
    Golub & Van Loan (4th ed.), sections 8.5.3 (parallel ordering) and
    8.6.3 (one-sided Jacobi).
  """
  a = a.astype(jnp.float32)
  a = 0.5 * (a + _mT(a))
  k = a.shape[-1]
  batch = a.shape[:-2]
  if k == 1:
    return a[..., 0], jnp.ones_like(a)
  pad = k % 2
  if pad:
    # An isolated extra index: a zero row in every column, never rotated.
    a = jnp.pad(a, [(0, 0)] * len(batch) + [(0, 1), (0, 1)])
  kk = k + pad
  h = kk // 2
  # Position order of a round-robin tournament: position i (< h) holds
  # player i and position h + i holds player kk - 1 - i.
  order = np.concatenate([np.arange(h), np.arange(kk - 1, h - 1, -1)])
  # The permuted identity from an iota: a NumPy one is a kk x kk constant
  # of the program (16 MiB per copy at k = 2048).
  eye = (jax.lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 2)
         == jnp.asarray(order, jnp.int32)).astype(jnp.float32)
  w = _mT(jnp.concatenate([jnp.take(a, order, axis=-1), eye], axis=-2))
  w, _, _ = jax.lax.while_loop(
      lambda c: (c[1] < sweeps) & (c[2] > tol),
      functools.partial(_one_sided_sweep, kk),
      (w, jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32)))
  w = jnp.take(_mT(w), np.argsort(order), axis=-1)  # columns in index order
  bv, v = w[..., :kk, :k], w[..., kk:, :k]
  if pad:
    bv, v = bv[..., :k, :], v[..., :k, :]
  vals = jnp.sum(v * bv, axis=-2)                       # v^T A v
  desc = jnp.argsort(-vals, axis=-1)
  return (jnp.take_along_axis(vals, desc, axis=-1),
          jnp.take_along_axis(v, desc[..., None, :], axis=-1))


def _one_sided_sweep(kk: int, carry: tuple) -> tuple:
  """One sweep of :func:`psd_eig`: ``kk - 1`` rounds on the stacked ``[B;
  V]``, held transposed (``kk x 2kk``: row ``i`` is column ``i``, rows in
  position order); returns the largest relative ``|gamma|`` met before
  rotation."""
  h = kk // 2

  def round_(_, wm):
    w, worst = wm
    top, bot = jnp.split(w, 2, axis=-2)            # the p and q columns
    bt, bb = top[..., :, :kk], bot[..., :, :kk]
    alpha = jnp.sum(bt * bt, axis=-1)
    beta = jnp.sum(bb * bb, axis=-1)
    gamma = jnp.sum(bt * bb, axis=-1)
    amax = jnp.maximum(jnp.max(alpha, axis=-1, keepdims=True),
                       jnp.max(beta, axis=-1, keepdims=True))
    scale = jnp.sqrt(amax * jnp.maximum(alpha, beta))
    worst = jnp.maximum(worst, jnp.max(jnp.where(
        scale > 0, jnp.abs(gamma) / jnp.where(scale > 0, scale, 1.0), 0.0)))
    nonzero = jnp.abs(gamma) > 0
    zeta = (beta - alpha) / (2.0 * jnp.where(nonzero, gamma, 1.0))
    tan = jnp.where(zeta >= 0, 1.0, -1.0) / (
        jnp.abs(zeta) + jnp.sqrt(1.0 + zeta * zeta))
    tan = jnp.where(nonzero, tan, 0.0)
    c = jax.lax.rsqrt(1.0 + tan * tan)[..., :, None]
    s = tan[..., :, None] * c
    top, bot = c * top - s * bot, s * top + c * bot
    if h == 1:
      return jnp.concatenate([top, bot], axis=-2), worst
    # Next round's positions: top' = [t0, b0, t1 .. t(h-2)],
    # bottom' = [b1 .. b(h-1), t(h-1)] (the round-robin rotation).
    sl = lambda x, i, j: x[..., i:j, :]
    return jnp.concatenate([sl(top, 0, 1), sl(bot, 0, 1), sl(top, 1, h - 1),
                            sl(bot, 1, h), sl(top, h - 1, h)],
                           axis=-2), worst

  w, n, _ = carry
  w, worst = jax.lax.fori_loop(0, kk - 1, round_,
                               (w, jnp.zeros([], jnp.float32)))
  return w, n + 1, worst


def top_eigvec_psd(g: jax.Array, squarings: int = 24,
                   tol: float = 1e-5) -> jax.Array:
  """A unit top eigenvector of symmetric PSD ``k x k`` matrices.

  Repeated squaring ``M <- M^2 / ||M^2||_F`` (up to ``2^squarings`` power
  steps) turns ``g`` into (a multiple of) the projector onto its top
  eigenspace; its largest column, refined by two power steps on ``g``, is
  returned. The squarings stop early, for the whole batch at once, when no
  ``M`` moves by more than ``tol`` (Frobenius; ``||M||_F = 1``) in one
  squaring: ``M`` is then a fixed point to float32 accuracy. Ties give some
  vector of the top eigenspace. A zero ``g`` gives ``e_1``.

  Args:
    g: PSD array ``(..., k, k)``.
    squarings: the most squarings.
    tol: the stopping threshold on the change of ``M`` in one squaring.

  Returns:
    unit vectors ``(..., k)``.

  Example:
    >>> import jax.numpy as jnp
    >>> v = top_eigvec_psd(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
    >>> [round(float(x), 4) for x in jnp.abs(v)]
    [0.0, 1.0, 0.0]
  """
  g = g.astype(jnp.float32)
  k = g.shape[-1]
  tiny = jnp.finfo(jnp.float32).tiny

  def normalize_f(m):
    n = jnp.sqrt(jnp.sum(m * m, axis=(-2, -1), keepdims=True))
    return m / jnp.maximum(n, tiny)

  def square(loop):
    i, m, _ = loop
    m2 = normalize_f(matmul(m, m))
    return i + 1, m2, jnp.max(jnp.sqrt(jnp.sum((m2 - m) ** 2, axis=(-2, -1))))

  _, m, _ = jax.lax.while_loop(
      lambda loop: (loop[0] < squarings) & (loop[2] > tol), square,
      (jnp.zeros([], jnp.int32), normalize_f(g), jnp.asarray(jnp.inf)))
  col_norms = jnp.sum(m * m, axis=-2)
  best = jnp.argmax(col_norms, axis=-1)
  v = jnp.take_along_axis(m, best[..., None, None], axis=-1)[..., 0]
  e1 = (jnp.arange(k) == 0).astype(jnp.float32)

  def unit(x):
    n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return jnp.where(n > tiny, x / jnp.maximum(n, tiny), e1)

  v = unit(v)
  for _ in range(2):
    v = unit(jnp.einsum("...ij,...j->...i", g, v, precision=HIGHEST))
  return v


def reorthonormalize(s: jax.Array) -> jax.Array:
  """One Newton-Schulz polar step ``S (3I - S^T S) / 2``.

  For ``S^T S = I + E`` this maps the error ``E`` to ``O(E^2)`` and leaves
  the span unchanged; only an ``r x r`` Gram and one matmul are used.
  """
  r = s.shape[-1]
  gram = matmul(_mT(s), s)
  return matmul(s, 1.5 * jnp.eye(r, dtype=s.dtype) - 0.5 * gram)


def reorthonormalize_if_needed(ss: Sequence[jax.Array],
                              tol: float = 1e-5) -> list[jax.Array]:
  """:func:`reorthonormalize` applied to all of ``ss`` if any needs it.

  ``||S^T S z - z||`` for the fixed unit probe ``z = 1/sqrt(r)`` measures
  the drift of each ``S`` (``4 d r`` flops); the Newton-Schulz step (two
  ``d x r x r`` products) runs, for the whole list, only when one of them
  drifted by more than ``tol``. A geodesic step keeps an orthonormal basis
  orthonormal to float32 rounding, so the drift grows only slowly (a
  basis stored in bfloat16 is re-orthonormalized at every step). The
  predicate is a scalar: one ``lax.cond``.

  Args:
    ss: bases ``(..., d, r)``.
    tol: the largest drift left uncorrected.

  Returns:
    the list of bases, float32.
  """
  ss = [s.astype(jnp.float32) for s in ss]

  def drift(s):
    z = jnp.full(s.shape[-1:] + (1,), 1.0 / math.sqrt(s.shape[-1]),
                 jnp.float32)
    e = matmul(_mT(s), matmul(s, z)) - z                  # (..., r, 1)
    return jnp.max(jnp.sqrt(jnp.sum(e * e, axis=(-2, -1))))

  worst = functools.reduce(jnp.maximum, [drift(s) for s in ss])
  # A non-finite drift also takes the step (the caller checks finiteness).
  return jax.lax.cond(~(worst <= tol),
                      lambda ss: [reorthonormalize(s) for s in ss],
                      lambda ss: list(ss), ss)


def subspace_iterations(rank: int, k: int) -> int:
  """Static count of subspace iterations.

  Chosen so that for singular values decaying by a factor 0.75 per index the
  error factor ``(sigma_{k+1} / sigma_rank)^(2q) = 0.75^(2q(k-rank+1))`` falls
  below 1e-8 (float32 resolution); at least 4, at most 24.
  """
  per_iter = 2 * (k - rank + 1) * math.log(1 / 0.75)
  return int(min(24, max(4, math.ceil(math.log(1e8) / per_iter))))


def flatten_batch(x: jax.Array) -> jax.Array:
  """``(batch..., a, b)`` -> ``(prod(batch), a, b)`` (a free reshape)."""
  return x.reshape((-1,) + x.shape[-2:])


def safe_frobenius_norm(x: jax.Array) -> jax.Array:
  """``||x||_F`` over the last two axes without over- or underflow.

  Scaled by the largest magnitude inside the reduction (fused, no copy).
  """
  amax = jnp.max(jnp.abs(x), axis=(-2, -1))
  scale = jnp.where(amax > 0, amax, 1.0)
  y = x / scale[..., None, None]
  return scale * jnp.sqrt(jnp.sum(y * y, axis=(-2, -1)))


def gram_apply(x: jax.Array, q: jax.Array, inv: jax.Array,
               transposed: bool = False) -> jax.Array:
  r"""``X_n X_n^T Q`` with ``X_n = inv * X``, ``X`` taken as it lies.

  .. math:: Y = \mathrm{inv}\,X\,(\mathrm{inv}\,X^T Q)

  (each factor scaled, so nothing overflows for a large ``X``).
  ``transposed``: ``x`` is ``X^T`` (``(..., D, d)``); the products are
  taken with it as it lies (no transposed copy).

  The two products with ``X`` run at JAX's default matmul precision, as
  the regular step's projection ``P = S^T X`` does (float32 on CPU; set
  ``jax.default_matmul_precision("highest")`` for float32 passes on TPU
  and GPU), not at :data:`HIGHEST`: a basis needs no more precision than
  the products it is used in, and on XLA:TPU each full-precision product
  with a gradient-sized matrix compiled into six bfloat16 passes and
  tripled the update's compile time (docs/performance.md). The small
  ``d x k`` and ``k x k`` factorizations that follow stay at
  :data:`HIGHEST` (they keep the basis orthonormal).

  Args:
    x: ``X`` ``(..., d, D)`` (or ``X^T`` if ``transposed``), float32.
    q: ``(..., d, k)``.
    inv: the scale, broadcastable to ``(..., 1, 1)``.
    transposed: see above.

  Returns:
    ``(..., d, k)`` float32.
  """
  mm = _sharding.sharded_matmul
  if transposed:
    return inv * _mT(mm(_mT(inv * mm(x, q)), x))
  return inv * mm(x, inv * mm(_mT(x), q))


def inverse_or_zero(norm: jax.Array) -> jax.Array:
  """``1 / norm``, 0 where ``norm`` is 0 (the scale of ``X_n = X / ||X||``;
  a zero ``X`` stays zero)."""
  return jnp.where(norm > 0, 1.0 / norm, 0.0)


def top_eigvecs_of_gram(gram, norm: jax.Array, q0: jax.Array,
                        rank: int) -> jax.Array:
  r"""Top-``rank`` eigenvectors of ``X X^T``, ``X`` seen through ``gram``.

  Subspace iteration on ``X_n X_n^T`` (``X_n = X / ||X||_F``) from the
  block ``q0`` (``(d, k)``, ``k >= rank``): ``Y_i = X_n X_n^T Q_i``,
  ``Q_{i+1} = orth(Y_i)`` (Householder, :func:`householder_orthonormalize`),
  :func:`subspace_iterations` times, then Rayleigh-Ritz: the ``k x k``
  matrix ``Q^T X_n X_n^T Q`` is diagonalized by Jacobi (:func:`psd_eig`)
  and the Ritz vectors ``Q W`` are returned in descending order of
  eigenvalue. ``gram`` is called at one place in the program (inside the
  loop) and the Householder and Jacobi loops are traced once, whatever
  ``gram`` is: the gradient is seen only through it and its norm.

  Args:
    gram: ``(Q, inv) -> inv X (inv X^T Q)`` (``(d, k) -> (d, k)``,
      float32; :func:`gram_apply`).
    norm: ``||X||_F``, broadcastable to ``(..., 1, 1)``; a non-finite norm
      (a non-finite ``X``) gives the first ``rank`` unit vectors.
    q0: the start block ``(d, k)`` (:func:`start_block`).
    rank: number of vectors.

  Returns:
    ``(d, rank)`` float32 with orthonormal columns.
  """
  d, k = q0.shape[-2:]
  iters = subspace_iterations(rank, k)
  inv = inverse_or_zero(norm)
  orth = lambda y: householder_orthonormalize(jnp.where(jnp.isfinite(y), y,
                                                        0.0))

  def step(i, qy):
    # The last pass only applies (its Q is the Rayleigh-Ritz basis): one
    # copy of gram and of the Householder loop in the program.
    q, _ = qy
    y = gram(q, inv)
    return jax.lax.cond(i < iters, orth, lambda y: q, y), y

  q, y = jax.lax.fori_loop(0, iters + 1, step, (q0, q0))
  _, w = psd_eig(matmul(_mT(q), y))
  s = matmul(q, w[..., :, :rank])
  unit = (jnp.arange(d)[:, None] == jnp.arange(rank)[None, :])
  ok = jnp.isfinite(norm) & jnp.all(jnp.isfinite(s), axis=(-2, -1),
                                    keepdims=True)
  return jnp.where(ok, s, unit.astype(s.dtype))


def _mix32(h: jax.Array) -> jax.Array:
  """An invertible avalanche mix of ``uint32`` words (multiply-xorshift, the
  "lowbias32" constants of C. Wellons' hash-prospector)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def start_block(d: int, rank: int) -> jax.Array:
  r"""The fixed start block ``(d, k)``, ``k = min(d, 2 rank)``, of the
  subspace iteration: deterministic and independent of the data.

  .. math:: Q_0[i, j] = \sqrt{3 / d}\;(2 u_{ij} - 1),\qquad
            u_{ij} = \big(\lfloor \mathrm{hash}(i k + j) / 2^8 \rfloor
            + \tfrac12\big) / 2^{24} \in (0, 1)

  (entries of variance ``1/d``: unit columns in expectation). The block is
  *computed in the program* from an iota and an integer hash
  (:func:`_mix32`), elementwise, so XLA lays it out like its consumer
  (sharded where ``Q`` is) and stores nothing: a block drawn on the host
  is a constant of the compiled program, one copy per branch that uses
  it (at the 7B shapes on XLA:TPU, three 32 MiB copies counted in every
  chip's peak). A continuous distribution is all the iteration needs (its
  start is then almost surely not deficient in the top-``rank``
  subspace); ``jax.random`` in the update compiled a threefry kernel and,
  at trace time, seven small programs.

  Example:
    >>> q0 = start_block(64, 4)
    >>> q0.shape
    (64, 8)
  """
  k = min(d, 2 * rank)
  idx = (jax.lax.broadcasted_iota(jnp.uint32, (d, k), 0) * jnp.uint32(k)
         + jax.lax.broadcasted_iota(jnp.uint32, (d, k), 1))
  bits = _mix32(idx ^ jnp.uint32(0x5B7A3C1D)) >> 8          # 24 random bits
  u = (bits.astype(jnp.float32) + 0.5) * (2.0 ** -24)       # (0, 1)
  return (2.0 * u - 1.0) * math.sqrt(3.0 / d)


def top_left_singular_vectors(x: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` left singular vectors of ``x`` (``..., d, D``).

  :func:`top_eigvecs_of_gram` of ``X_n X_n^T`` (``X_n = X / ||X||_F``,
  :func:`gram_apply`) from a fixed pseudo-random block of
  ``k = min(d, 2 * rank)`` columns (:func:`start_block`): subspace
  iteration with Householder orthonormalization, then Rayleigh-Ritz by
  Jacobi; the Ritz vectors are returned in descending order of singular
  value. Columns are
  orthonormal for any input, zero and rank-deficient ``x`` included; a
  matrix with a non-finite entry gets the first ``rank`` unit vectors.

  Args:
    x: array ``(..., d, D)``.
    rank: number of vectors, ``rank <= d``.

  Returns:
    ``S`` of shape ``(..., d, rank)``, float32.

  Example:
    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (16, 24))
    >>> top_left_singular_vectors(x, 4).shape
    (16, 4)
  """
  x = x.astype(jnp.float32)
  q0 = start_block(x.shape[-2], rank)
  q0 = jnp.broadcast_to(q0, x.shape[:-1] + q0.shape[-1:])
  return top_eigvecs_of_gram(functools.partial(gram_apply, x),
                             safe_frobenius_norm(x)[..., None, None], q0,
                             rank)
