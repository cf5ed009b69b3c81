"""Grassmannian subspace tracking: one rank-1 geodesic step per update.

SubTrack++ moves the basis ``S`` (``d x r``, orthonormal columns) along a
geodesic of the Grassmann manifold in the direction that most decreases the
projection error ``F(S) = ||X - S S^T X||_F^2`` of the current gradient.
"""

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from subtrack_optax import _linalg

__all__ = ["TrackSteps", "GeodesicStep", "geodesic_step", "grassmann_step",
           "grassmann_step_multi", "rotated_projection"]


class TrackSteps(NamedTuple):
  """What :func:`grassmann_step_multi` returns: one list entry per matrix.

  Attributes:
    bases: the new bases ``S'`` (float32, the input shapes).
    thetas: the rotation angles (0 where the basis was kept), batch shape.
    axes: the rotation axes ``v`` (``(..., r)``): ``S'^T S = I + (cos(theta)
      - 1) v v^T`` in exact arithmetic.
    projections: ``S'^T X`` if ``projections`` were given, else ``None``s.
  """

  bases: list
  thetas: list
  axes: list
  projections: list


def grassmann_step(s: jax.Array, x: jax.Array, step_size,
                   normalize: bool = True) -> tuple[jax.Array, jax.Array]:
  r"""One Grassmannian geodesic step of the basis towards the gradient.

  .. math::

     X_n &= X / \|X\|_F \quad (\text{if normalize}),\qquad A = S^T X_n \\
     \nabla &= -2 (X_n - S A) A^T, \qquad T = \nabla - S (S^T \nabla) \\
     (u, \sigma, v) &= \text{top singular triplet of } T
       \quad (v \text{ from the } r \times r \text{ Gram } T^T T) \\
     \theta &= \text{step\_size}\cdot\sigma, \qquad
     S' = S + \big(S v (\cos\theta - 1) - u \sin\theta\big) v^T

  (Edelman, Arias & Smith 1998, Thm 2.3, for the rank-1 direction
  ``-T = -u sigma v^T``.) ``S'`` is orthonormal in exact arithmetic; a
  Newton-Schulz step removes the rounding drift once it exceeds 1e-5
  (:func:`~subtrack_optax._linalg.reorthonormalize_if_needed`). If ``sigma`` is 0 or any
  input or result is non-finite, ``S`` is returned unchanged.

  The tangent is formed as ``T = -2 (I - S S^T) X_n A^T`` (equal to the
  line above since ``(I - S S^T) S = 0``): no ``d x D`` temporary beyond the
  input and no ``r x D x r`` product.

  Args:
    s: basis ``(..., d, r)``.
    x: gradient in the canonical frame ``(..., d, D)``.
    step_size: the step size (radians per unit ``sigma``).
    normalize: divide ``X`` by its Frobenius norm first, so ``sigma <= 1``
      and ``step_size`` bounds the rotation angle.

  Returns:
    ``(S', theta)``: the new basis (float32) and the rotation angle applied
    (0 where the basis was kept), shape ``(...)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = jnp.eye(8, 2)
    >>> x = jax.random.normal(jax.random.key(0), (8, 16))
    >>> s_new, theta = grassmann_step(s, x, 0.5)
    >>> s_new.shape
    (8, 2)

  References:
    Rajabi, Nonta & Rambhatla, SubTrack++ (NeurIPS 2025, arXiv 2502.01586),
    Alg. 1; Edelman, Arias & Smith, SIAM J. Matrix Anal. Appl. 20(2), 1998.
  """
  steps = grassmann_step_multi([s], [x], step_size, normalize)
  return steps.bases[0], steps.thetas[0]


def grassmann_step_multi(ss: Sequence[jax.Array], xs: Sequence[jax.Array],
                         step_size, normalize: bool = True,
                         projections: Optional[Sequence[jax.Array]] = None,
                         transposed: Optional[Sequence[bool]] = None
                         ) -> TrackSteps:
  """:func:`grassmann_step` for several matrices of one shape ``(d, D)``.

  Leaf by leaf: ``Y = X_n X_n^T S`` (:func:`~subtrack_optax._linalg.gram_apply`;
  ``X_n = X / ||X||_F`` is never materialized: the products are scaled),
  then :func:`geodesic_step` (a leaf's batch slices at once).

  Since ``(I - S S^T) S = 0``, the tangent is
  ``T = -2 (I - S S^T) X_n A^T``: the ``r x D x r`` product ``A A^T`` of the
  Euclidean gradient is never needed. (Rounding leaves ``T`` off the
  tangent space by about ``eps ||X_n A^T||``; it enters ``S'`` times
  ``sin(theta)``, and ``theta`` is proportional to ``||T||``.)

  ``transposed[i]`` says that ``xs[i]`` is given as ``X^T`` (``(..., D,
  d)``, a leaf whose basis spans its output side, in its own layout): the
  products are then taken with it as it lies, and no transposed copy is
  made.

  It also returns, per matrix, the rotation's axis ``v`` (``(..., r)``): in
  exact arithmetic the change of basis is then
  ``S'^T S = I + (cos(theta) - 1) v v^T``, which the moment transport uses.

  ``projections``, if given, are the ``P = S^T X`` (``(..., r, D)``, float32)
  already computed: they replace the product ``S^T X``, and the projections
  on the new basis are returned as well, from
  ``S' = S + w v^T`` (``w = S v (cos(theta) - 1) - u sin(theta)``):
  ``S'^T X = P + v (w^T X)``, one vector-matrix product instead of a
  ``d x D x r`` one. (In exact arithmetic the Newton-Schulz step is the
  identity, and it is left out of this update; its effect on ``S'`` is at
  the rounding level.)

  Returns:
    :class:`TrackSteps` (lists ``S'``, ``theta``, ``v`` and ``S'^T X``).
  """
  mm = _linalg.matmul
  mt = lambda a: jnp.swapaxes(a, -1, -2)
  flat = _linalg.flatten_batch  # (batch..., a, b) -> (prod(batch), a, b)
  transposed = transposed or [False] * len(xs)
  if projections is None:
    projections = [None] * len(xs)
  out = TrackSteps([], [], [], [])
  for s0, x, p, t in zip(ss, xs, projections, transposed):
    s, x = flat(s0).astype(jnp.float32), flat(x).astype(jnp.float32)
    norm = _linalg.safe_frobenius_norm(x)[:, None, None]
    inv = (_linalg.inverse_or_zero(norm) if normalize
           else jnp.ones_like(norm))
    if p is None:   # X_n X_n^T S
      y = _linalg.gram_apply(x, s, inv, transposed=t)
    else:           # X_n A^T with A = S^T X_n = inv P
      a = inv * flat(p)
      y = inv * (mt(mm(a, x)) if t else mm(x, mt(a)))
    step = geodesic_step(s, y, jnp.isfinite(norm[:, 0, 0]), step_size)
    shape = s0.shape
    out.bases.append(step.basis.reshape(shape))
    out.thetas.append(step.theta.reshape(shape[:-2]))
    out.axes.append(step.axis.reshape(shape[:-2] + shape[-1:]))
    if p is not None:
      w = step.direction
      wx = (mm(x, w[..., :, None])[..., 0] if t               # w^T X: (D,)
            else mm(w[..., None, :], x)[..., 0, :])
      p = rotated_projection(flat(p), step, wx).reshape(p.shape)
    out.projections.append(p)
  return out


class GeodesicStep(NamedTuple):
  """What :func:`geodesic_step` returns (leading batch axes ``...``).

  Attributes:
    basis: ``S'`` ``(..., d, r)`` (``S`` where the step was not taken).
    theta: the angle ``(...)``, 0 where the step was not taken.
    axis: the rotation axis ``v`` ``(..., r)``.
    direction: ``w = S v (cos(theta) - 1) - u sin(theta)`` ``(..., d)``
      (``S' = S + w v^T`` before re-orthonormalization).
  """

  basis: jax.Array
  theta: jax.Array
  axis: jax.Array
  direction: jax.Array


def geodesic_step(s: jax.Array, y: jax.Array, finite: jax.Array,
                  step_size) -> GeodesicStep:
  r"""One rank-1 geodesic step of ``S`` given ``Y = X_n X_n^T S``.

  .. math::

     T &= -2\,(Y - S\,S^T Y) = -2 (I - S S^T) X_n A^T,\quad A = S^T X_n\\
     v &= \text{top eigenvector of } T^T T,\quad
     \sigma = \|T v\|,\quad u = T v / \sigma,\quad
     \theta = \text{step\_size}\cdot\sigma \\
     S' &= S + \big(S v (\cos\theta - 1) - u \sin\theta\big) v^T

  The gradient enters only through ``Y`` (``d x r``), so this code is the
  same for every matrix shape ``(d, D)`` with the same ``(d, r)``. Where
  ``finite`` is False, ``sigma`` is 0 or anything is non-finite, ``S`` is
  kept (``theta = 0``). The Newton-Schulz step of
  :func:`~subtrack_optax._linalg.reorthonormalize_if_needed` removes the
  rounding drift once it exceeds 1e-5.

  Args:
    s: the basis ``(..., d, r)``, float32, orthonormal columns.
    y: ``X_n X_n^T S`` ``(..., d, r)``, float32.
    finite: whether ``X`` is finite ``(...)``.
    step_size: radians per unit ``sigma``.

  Returns:
    :class:`GeodesicStep`.
  """
  mm = _linalg.matmul
  mt = lambda a: jnp.swapaxes(a, -1, -2)
  hp = _linalg.HIGHEST
  tangent = -2.0 * (y - mm(s, mm(mt(s), y)))
  gram = mm(mt(tangent), tangent)
  v = _linalg.top_eigvec_psd(gram)
  sigma_sq = jnp.einsum("...i,...ij,...j->...", v, gram, v, precision=hp)
  sigma = jnp.sqrt(jnp.maximum(sigma_sq, 0.0))
  ok = finite & (sigma > 0) & jnp.isfinite(sigma)
  u = jnp.einsum("...dr,...r->...d", tangent, v, precision=hp) / jnp.where(
      ok, sigma, 1.0)[..., None]
  theta = jnp.where(ok, step_size * sigma, 0.0)
  sv = jnp.einsum("...dr,...r->...d", s, v, precision=hp)
  w = (sv * (jnp.cos(theta) - 1.0)[..., None]
       - u * jnp.sin(theta)[..., None])                       # (..., d)
  (s_new,) = _linalg.reorthonormalize_if_needed(
      [s + w[..., :, None] * v[..., None, :]])
  ok = ok & jnp.all(jnp.isfinite(s_new), axis=(-2, -1))
  return GeodesicStep(jnp.where(ok[..., None, None], s_new, s),
                      jnp.where(ok, theta, 0.0), v, w)


def rotated_projection(p: jax.Array, step: GeodesicStep,
                       wx: jax.Array) -> jax.Array:
  r"""``S'^T X`` from ``P = S^T X`` after a geodesic step, without a
  ``d x D x r`` product.

  .. math:: S' = S + w v^T \;\Rightarrow\; S'^T X = P + v\,(w^T X)

  (``P`` where the step was not taken, ``theta = 0``). The Newton-Schulz
  correction :func:`geodesic_step` applies once the drift exceeds 1e-5 is
  left out: a change at the rounding level.

  Args:
    p: ``P`` ``(..., r, D)``, float32.
    step: the :class:`GeodesicStep` (its ``axis`` ``v``, ``theta``).
    wx: ``w^T X`` ``(..., D)`` for the step's ``direction`` ``w``.

  Returns:
    ``S'^T X`` ``(..., r, D)``.
  """
  moved = p + step.axis[..., :, None] * wx[..., None, :]
  return jnp.where((step.theta != 0)[..., None, None], moved, p)
