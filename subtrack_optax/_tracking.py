"""Grassmannian subspace tracking: one rank-1 geodesic step per update.

SubTrack++ moves the basis ``S`` (``d x r``, orthonormal columns) along a
geodesic of the Grassmann manifold in the direction that most decreases the
projection error ``F(S) = ||X - S S^T X||_F^2`` of the current gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subtrack_optax import _linalg

__all__ = ["grassmann_step"]


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
  mm = _linalg.matmul
  mt = lambda a: jnp.swapaxes(a, -1, -2)
  s = s.astype(jnp.float32)
  x = x.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(x), axis=(-2, -1))
  x = jnp.where(finite[..., None, None], x, 0.0)
  if normalize:
    norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / jnp.where(norm > 0, norm, 1.0)
  a = mm(mt(s), x)                                   # (r, D)
  grad = -2.0 * (mm(x, mt(a)) - mm(s, mm(a, mt(a))))  # (d, r)
  tangent = grad - mm(s, mm(mt(s), grad))
  gram = mm(mt(tangent), tangent)                    # (r, r)
  v = _linalg.top_eigvec_psd(gram)                   # (r,)
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
  return jnp.where(ok[..., None, None], s_new, s), jnp.where(ok, theta, 0.0)
