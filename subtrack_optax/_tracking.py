"""Grassmannian subspace tracking: one rank-1 geodesic step per update.

SubTrack++ moves the basis ``S`` (``d x r``, orthonormal columns) along a
geodesic of the Grassmann manifold in the direction that most decreases the
projection error ``F(S) = ||X - S S^T X||_F^2`` of the current gradient.
"""

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _linalg

__all__ = ["TrackSteps", "grassmann_step", "grassmann_step_multi"]


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

  Everything is computed leaf by leaf except the top eigenvector of the
  ``r x r`` Gram matrices, which runs once on them stacked (its loop is
  traced once per group), and the re-orthonormalization decision, one for
  the group (:func:`~subtrack_optax._linalg.reorthonormalize_if_needed`).
  ``X_n = X / ||X||_F`` is never materialized: the products are scaled.

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
  hp = _linalg.HIGHEST
  flat = _linalg.flatten_batch  # (batch..., a, b) -> (prod(batch), a, b)
  transposed = transposed or [False] * len(xs)
  if projections is None:
    projections = [None] * len(xs)
  leaves = []
  for s, x, p, t in zip(ss, xs, projections, transposed):
    s, x = flat(s).astype(jnp.float32), flat(x).astype(jnp.float32)
    norm = _linalg.safe_frobenius_norm(x)
    inv = (jnp.where(norm > 0, 1.0 / norm, 0.0) if normalize
           else jnp.ones_like(norm))[:, None, None]
    # A = S^T X_n (r, D) and X_n A^T (d, r), X taken as it lies.
    a = inv * (flat(p) if p is not None
               else mt(mm(x, s)) if t else mm(mt(s), x))
    xat = inv * (mt(mm(a, x)) if t else mm(x, mt(a)))
    tangent = -2.0 * (xat - mm(s, mm(mt(s), xat)))
    leaves.append((s, x, jnp.isfinite(norm), tangent))
  # Only the r x r Gram matrices are stacked: one eigen-solver for the group.
  grams = [mm(mt(tangent), tangent) for *_, tangent in leaves]
  axes = jnp.split(_linalg.top_eigvec_psd(jnp.concatenate(grams)),
                   np.cumsum([len(g) for g in grams])[:-1])
  steps = []
  for (s, x, finite, tangent), gram, v in zip(leaves, grams, axes):
    sigma_sq = jnp.einsum("...i,...ij,...j->...", v, gram, v, precision=hp)
    sigma = jnp.sqrt(jnp.maximum(sigma_sq, 0.0))
    ok = finite & (sigma > 0) & jnp.isfinite(sigma)
    u = jnp.einsum("...dr,...r->...d", tangent, v, precision=hp) / jnp.where(
        ok, sigma, 1.0)[..., None]
    theta = jnp.where(ok, step_size * sigma, 0.0)
    sv = jnp.einsum("...dr,...r->...d", s, v, precision=hp)
    w = (sv * (jnp.cos(theta) - 1.0)[..., None]
         - u * jnp.sin(theta)[..., None])                     # (d,)
    steps.append((s + w[..., :, None] * v[..., None, :], ok, theta, w))
  s_news = _linalg.reorthonormalize_if_needed([step[0] for step in steps])
  out = TrackSteps([], [], [], [])
  for (s, x, *_), (_, ok, theta, w), s_new, v, shape, p, t in zip(
      leaves, steps, s_news, axes, [si.shape for si in ss], projections,
      transposed):
    ok = ok & jnp.all(jnp.isfinite(s_new), axis=(-2, -1))
    out.bases.append(jnp.where(ok[:, None, None], s_new, s).reshape(shape))
    out.thetas.append(jnp.where(ok, theta, 0.0).reshape(shape[:-2]))
    out.axes.append(v.reshape(shape[:-2] + shape[-1:]))
    if p is not None:
      wx = (mm(x, w[..., :, None])[..., 0] if t               # w^T X: (D,)
            else mm(w[..., None, :], x)[..., 0, :])
      pf = flat(p)
      p = jnp.where(ok[:, None, None], pf + v[..., :, None] * wx[..., None, :],
                    pf).reshape(p.shape)
    out.projections.append(p)
  return out
