"""Grassmannian subspace tracking: one rank-1 geodesic step per update.

SubTrack++ moves the basis ``S`` (``d x r``, orthonormal columns) along a
geodesic of the Grassmann manifold in the direction that most decreases the
projection error ``F(S) = ||X - S S^T X||_F^2`` of the current gradient.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _linalg

__all__ = ["grassmann_step", "grassmann_step_multi"]


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
  ``-T = -u sigma v^T``.) ``S'`` is orthonormal in exact arithmetic; one
  Newton-Schulz step removes the rounding drift. If ``sigma`` is 0 or any
  input or result is non-finite, ``S`` is returned unchanged.

  ``(X_n - S A) A^T`` is formed as ``X_n A^T - S (A A^T)``: no ``d x D``
  temporary beyond the input.

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
  s_new, theta = grassmann_step_multi([s], [x], step_size, normalize)
  return s_new[0], theta[0]


def grassmann_step_multi(ss: Sequence[jax.Array], xs: Sequence[jax.Array],
                         step_size, normalize: bool = True
                         ) -> tuple[list[jax.Array], list[jax.Array]]:
  """:func:`grassmann_step` for several matrices of one shape ``(d, D)``.

  The products with each ``X`` (``A = S^T X_n`` and ``X_n A^T``) are taken
  leaf by leaf; everything after them is ``d x r`` or ``r x r`` and runs
  once on the stacked leaves, so its code is traced once per group.
  ``X_n = X / ||X||_F`` is never materialized: the products are scaled.
  """
  mm = _linalg.matmul
  mt = lambda a: jnp.swapaxes(a, -1, -2)
  shapes = [s.shape for s in ss]
  flat = _linalg._flat  # (batch..., a, b) -> (prod(batch), a, b)
  xs = [flat(x).astype(jnp.float32) for x in xs]
  sizes = [x.shape[0] for x in xs]
  split = lambda a: jnp.split(a, np.cumsum(sizes)[:-1], axis=0)
  s = jnp.concatenate([flat(si).astype(jnp.float32) for si in ss])
  norms = jnp.concatenate([_linalg.safe_frobenius_norm(x) for x in xs])
  finite = jnp.isfinite(norms)
  inv = (jnp.where(norms > 0, 1.0 / norms, 0.0) if normalize
         else jnp.ones_like(norms))[:, None, None]
  a = inv * jnp.concatenate(
      [mm(mt(si), x) for si, x in zip(split(s), xs)])      # (r, D)
  xat = inv * jnp.concatenate(
      [mm(x, mt(ai)) for x, ai in zip(xs, split(a))])      # (d, r)
  grad = -2.0 * (xat - mm(s, mm(a, mt(a))))
  tangent = grad - mm(s, mm(mt(s), grad))
  gram = mm(mt(tangent), tangent)                          # (r, r)
  v = _linalg.top_eigvec_psd(gram)                         # (r,)
  sigma_sq = jnp.einsum("...i,...ij,...j->...", v, gram, v,
                        precision=_linalg.HIGHEST)
  sigma = jnp.sqrt(jnp.maximum(sigma_sq, 0.0))
  ok = finite & (sigma > 0) & jnp.isfinite(sigma)
  safe_sigma = jnp.where(ok, sigma, 1.0)
  u = jnp.einsum("...dr,...r->...d", tangent, v,
                 precision=_linalg.HIGHEST) / safe_sigma[..., None]
  theta = jnp.where(ok, step_size * sigma, 0.0)
  sv = jnp.einsum("...dr,...r->...d", s, v, precision=_linalg.HIGHEST)
  direction = sv * (jnp.cos(theta) - 1.0)[..., None] - u * jnp.sin(theta)[
      ..., None]
  s_new = s + direction[..., :, None] * v[..., None, :]
  s_new = _linalg.reorthonormalize(s_new)
  ok = ok & jnp.all(jnp.isfinite(s_new), axis=(-2, -1))
  s_new = jnp.where(ok[..., None, None], s_new, s)
  theta = jnp.where(ok, theta, 0.0)
  return ([si.reshape(shape) for si, shape in zip(split(s_new), shapes)],
          [ti.reshape(shape[:-2]) for ti, shape in zip(split(theta), shapes)])
