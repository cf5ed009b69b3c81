r"""The SubTrack++ equations, one function each, for one projected leaf.

Notation (per matrix; batch axes broadcast): ``X`` (``d x D``) the gradient
in the canonical frame, ``S`` (``d x r``) the orthonormal basis, ``P = S^T
X`` (``r x D``) the projection, ``M``/``V`` (``r x D``) Adam's moments, ``t``
the step count. Everything is float32; the matrix ``g`` is taken as it lies
(``(batch..., m, n)``, :class:`~subtrack_optax._frame.Frame`), never copied
transposed. The update composes them (``_step.regular_step``):

.. math::

   P = S^T X,\quad (N, M, V) = \mathrm{adam}(P, M, V, t),\quad
   (\phi, \lambda) = \mathrm{gains}(N, P, X),\quad
   \phi \leftarrow \mathrm{limit}(\phi, \lambda),\quad
   U = S(\text{scale}\,N - \phi P) + X\,\mathrm{diag}(\phi)

and, when the basis changes from ``S`` to ``S'``, the moments are
transported by ``C = S'^T S``.

References:
  Rajabi, Nonta & Rambhatla, SubTrack++ (NeurIPS 2025, arXiv 2502.01586);
  Robert et al., LDAdam (ICLR 2025) for the moment transport;
  Chen et al., Fira (arXiv 2410.01623) for recovery scaling and the limiter.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from subtrack_optax import _frame
from subtrack_optax import _linalg

__all__ = [
    "TRANSPORTS",
    "RECOVERIES",
    "project",
    "change_of_basis",
    "transport_general",
    "transport_rank1",
    "transport_moments",
    "moment_ratio_bound",
    "adam_direction",
    "recovery_gains",
    "limit_growth",
    "back_project",
]

# Named forms of the moment transport and of the recovery residual.
TRANSPORTS = ("ldadam", "debiased", "reference", "reset")
RECOVERIES = ("orthogonal", "reference")


def project(frame: _frame.Frame, g: jax.Array, s: jax.Array) -> jax.Array:
  r"""Projection :math:`P = S^T X` (``(batch..., r, D)``), ``g`` as it lies.

  Example:
    >>> import jax.numpy as jnp
    >>> from subtrack_optax import _frame, _plans
    >>> plan = _plans.resolve_plans(jnp.zeros((4, 8)), None, 2, "small")
    >>> project(_frame.Frame(plan), jnp.ones((4, 8)), jnp.eye(4, 2)).shape
    (2, 8)
  """
  return frame.project(g, s)


def change_of_basis(s_new: jax.Array, s_old: jax.Array) -> jax.Array:
  r"""The ``r x r`` change of basis :math:`C = S_{new}^T S_{old}`."""
  return _linalg.matmul(jnp.swapaxes(s_new, -1, -2), s_old)


def transport_general(c: jax.Array, m: jax.Array,
                      z: jax.Array) -> tuple[jax.Array, jax.Array]:
  r""":math:`(C M,\ (C \circ C) Z)` for any change of basis ``C``.

  Two ``r x r x D`` products.
  """
  return _linalg.matmul(c, m), _linalg.matmul(c * c, z)


def transport_rank1(axis: jax.Array, theta: jax.Array, m: jax.Array,
                    z: jax.Array) -> tuple[jax.Array, jax.Array]:
  r""":math:`(C M,\ (C \circ C) Z)` for a rank-1 rotation, in ``O(r D)``.

  A geodesic step turns the basis by ``theta`` about the unit axis ``v``:
  :math:`C = I + \beta v v^T`, :math:`\beta = \cos\theta - 1` (exactly, see
  :func:`~subtrack_optax._tracking.geodesic_step`). With
  :math:`w = v \circ v`:

  .. math::

     C M = M + \beta v (v^T M), \qquad
     (C \circ C) Z = Z + 2\beta\, w \circ Z + \beta^2 w (w^T Z)

  (rows scaled by ``w``): no ``C`` and no ``r x r x D`` product.
  """
  axis = axis.astype(jnp.float32)[..., :, None]               # (r, 1)
  # cos(theta) - 1 without cancellation for small angles.
  beta = (-2.0 * jnp.sin(0.5 * theta) ** 2)[..., None, None]
  w = axis * axis
  cm = m + beta * axis * jnp.sum(axis * m, axis=-2, keepdims=True)
  ccz = (z + 2.0 * beta * w * z
         + beta * beta * w * jnp.sum(w * z, axis=-2, keepdims=True))
  return cm, ccz


def moment_ratio_bound(b1, b2) -> jax.Array:
  r"""``K`` with :math:`M^2 \le K V` for every Adam state (:math:`\beta_1^2 <
  \beta_2`), and the floor the transport keeps.

  Adam's moments are weighted sums of the same gradients, so by
  Cauchy-Schwarz :math:`m_t^2 \le K v_t` with

  .. math::

     K = \frac{(1-\beta_1)^2}{(1-\beta_2)(1-\beta_1^2/\beta_2)},

  and an Adam step keeps it: if :math:`m^2 \le K v`, then
  :math:`(\beta_1 m + (1-\beta_1) g)^2 \le (\beta_1^2 K/\beta_2 +
  (1-\beta_1)^2/(1-\beta_2))(\beta_2 v + (1-\beta_2) g^2) = K v'`. So
  Adam's direction obeys :math:`|\hat m|/\sqrt{\hat v} \le \sqrt{K}
  \sqrt{1-\beta_2^t}/(1-\beta_1^t)`.

  Returns ``kappa = min(1, K)`` (1 when :math:`\beta_1^2 \ge \beta_2`, where
  Adam has no such bound): :func:`transport_moments` keeps :math:`V' \ge
  M'^2/\kappa \ge M'^2/K`, so the invariant, and with it plain Adam's
  bound on the direction, holds after every transport and every later step.
  """
  b1 = jnp.asarray(b1, jnp.float32)
  b2 = jnp.asarray(b2, jnp.float32)
  ok = b1 * b1 < b2
  k = (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / jnp.where(ok, b2, 1.0)))
  return jnp.where(ok, jnp.minimum(k, 1.0), 1.0)


def transport_moments(s_new: jax.Array, s_old: jax.Array, mu: jax.Array,
                      nu: jax.Array, rotation=None, *,
                      change: Optional[jax.Array] = None, form: str = "ldadam",
                      count: Optional[jax.Array] = None, b1: float = 0.9,
                      b2: float = 0.999) -> tuple[jax.Array, jax.Array]:
  r"""Projection-aware moment transport into the new basis.

  With :math:`C = S_{new}^T S_{old}` (or the rank-1 ``rotation=(v,
  theta)``, :func:`transport_rank1`), :math:`M' = C M` and, by ``form``:

  - ``"ldadam"`` (LDAdam): :math:`V' = \max(C^{\circ 2}(V - M^{\circ 2})
    + (CM)^{\circ 2}, 0)`;
  - ``"debiased"`` (the same on bias-corrected moments, mapped back):
    :math:`V' = \max(C^{\circ 2}(V - \rho M^{\circ 2}) + \rho (CM)^{\circ
    2}, 0)`, :math:`\rho = (1-\beta_2^t)/(1-\beta_1^t)^2`, ``t = count``;
  - ``"reference"`` (the reference code): :math:`V' = (1-\beta_2)\,
    |C^{\circ 2}(V - M^{\circ 2}) + (CM)^{\circ 2}|`;
  - ``"reset"``: :math:`V' = 0` (the second moment's history is dropped;
    the floor below makes it :math:`M'^{\circ 2}/\kappa`, the least
    consistent with the transported first moment);

  then, in every form, :math:`V' \leftarrow \max(V', M'^{\circ 2}/\kappa)`
  (:func:`moment_ratio_bound`): the transported moments satisfy Adam's
  invariant :math:`M'^2 \le K V'`, so the next Adam directions obey plain
  Adam's bound. (Without it, when consecutive gradients are alike ``V - M^2``
  is strongly negative, ``V'`` falls below ``M'^2`` or to 0 while ``M'`` does
  not, and a coordinate whose new projection is near zero gets a step of
  ``M'/eps``: every value finite, the update 10^6 times Adam's.)

  Args:
    s_new: the new basis ``(..., d, r)`` (float32).
    s_old: the old basis.
    mu: first moments ``(..., r, D)``.
    nu: second moments.
    rotation: ``(v, theta)`` when ``S_new`` is ``S_old`` turned by a rank-1
      geodesic step (then ``s_new``/``s_old`` are not used).
    change: the change of basis ``C`` if already computed (then
      ``s_new``/``s_old`` are not used).
    form: one of :data:`TRANSPORTS`.
    count: the step count ``t`` (``"debiased"`` only).
    b1: first-moment decay.
    b2: second-moment decay.

  Returns:
    ``(M', V')`` in the dtypes of ``mu`` and ``nu``.
  """
  m32 = mu.astype(jnp.float32)
  # An overflowed second moment (a spike: V = inf while M is finite, as in
  # optax's Adam) must not turn into NaN here (inf - inf, 0 * inf in the
  # products): it is read as the largest float, so V' stays +inf or huge
  # and the next Adam directions of those coordinates are 0, as optax's.
  v32 = jnp.minimum(nu.astype(jnp.float32), jnp.finfo(jnp.float32).max)
  if form == "debiased":
    t = count.astype(jnp.float32)
    # (t = 0, where the moments are zero, would give 0/0.)
    rho = jnp.where(t > 0, (1 - b2 ** t) / (1 - b1 ** t) ** 2, 1.0)
    z = v32 - rho * m32 * m32
  else:
    rho = None
    z = v32 - m32 * m32
  if rotation is None:
    c = change_of_basis(s_new, s_old) if change is None else change
    cm, ccz = transport_general(c, m32, z)
  else:
    cm, ccz = transport_rank1(*rotation, m32, z)
  if form == "debiased":
    v_new = ccz + rho * cm * cm
  elif form == "reference":
    v_new = (1 - b2) * jnp.abs(ccz + cm * cm)
  elif form == "reset":
    v_new = jnp.zeros_like(cm)
  else:
    v_new = ccz + cm * cm
  v_new = jnp.maximum(v_new, cm * cm / moment_ratio_bound(b1, b2))
  return cm.astype(mu.dtype), v_new.astype(nu.dtype)


def adam_direction(p: jax.Array, mu: jax.Array, nu: jax.Array,
                   count_inc: jax.Array, b1: float, b2: float,
                   eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Adam in the subspace.

  .. math::

     M &\leftarrow \beta_1 M + (1-\beta_1) P,\qquad
     V \leftarrow \beta_2 V + (1-\beta_2) P^{\circ 2}\\
     N &= \hat M / (\sqrt{\hat V} + \epsilon),\quad
     \hat M = M / (1-\beta_1^t),\ \hat V = V / (1-\beta_2^t)

  with ``t = count_inc`` (the count after this update).

  Returns:
    ``(N, M, V)``.
  """
  mu = (1 - b1) * p + b1 * mu
  nu = (1 - b2) * (p * p) + b2 * nu
  c = count_inc.astype(jnp.float32)
  mu_hat = mu / (1 - jnp.asarray(b1, jnp.float32) ** c)
  nu_hat = nu / (1 - jnp.asarray(b2, jnp.float32) ** c)
  return mu_hat / (jnp.sqrt(nu_hat) + eps), mu, nu


def recovery_gains(n: jax.Array, p: jax.Array, x_sq: jax.Array,
                   gram_p: Optional[jax.Array] = None,
                   residual_scale: float = 1.0
                   ) -> tuple[jax.Array, jax.Array]:
  r"""Recovery gains and the recovery term's norm.

  .. math::

     \phi_j = \|N_{:,j}\| / (\|P_{:,j}\| + 10^{-8}),\qquad
     \lambda = \|(X - c\,S P)\,\mathrm{diag}(\phi)\|_F

  (``c = residual_scale``: 1 for the discarded gradient ``X - S S^T X``;
  the reference code uses ``c = scale``). The norm comes from column norms,
  :math:`\|X_j - c S P_j\|^2 = \|X_j\|^2 - 2c\|P_j\|^2 + c^2 P_j^T (S^T S)
  P_j`, without forming the ``d x D`` residual; for a basis stored in float32
  ``S^T S = I`` (``gram_p=None``), else ``gram_p = (S^T S) P``.

  Args:
    n: the Adam direction ``N`` (``(..., r, D)``).
    p: the projection ``P``.
    x_sq: ``||X_j||^2`` per column (``(..., D)``).
    gram_p: ``(S^T S) P`` for a basis stored narrower than float32.
    residual_scale: ``c``.

  Returns:
    ``(phi, lambda)``: ``(..., D)`` and ``(...)``.
  """
  p_sq = jnp.sum(p * p, axis=-2)
  n_sq = jnp.sum(n * n, axis=-2)
  c = residual_scale
  if c == 1.0:
    resid_sq = (x_sq - 2.0 * p_sq + jnp.sum(p * gram_p, axis=-2)
                if gram_p is not None else x_sq - p_sq)
  elif gram_p is not None:
    resid_sq = x_sq - 2.0 * c * p_sq + c * c * jnp.sum(p * gram_p, axis=-2)
  else:
    resid_sq = x_sq - (2.0 * c - c * c) * p_sq
  resid_sq = jnp.maximum(resid_sq, 0.0)
  phi = jnp.sqrt(n_sq) / (jnp.sqrt(p_sq) + 1e-8)
  return phi, jnp.sqrt(jnp.sum(phi * phi * resid_sq, axis=-1))


def limit_growth(phi: jax.Array, lam: jax.Array, prev: jax.Array,
                 count: jax.Array, zeta: float) -> tuple[jax.Array, jax.Array]:
  r"""Norm-growth limiter on the recovery term.

  .. math::

     f = \min(1, \zeta \lambda_{prev} / \lambda) \text{ if } t > 0
     \text{ else } 1,\qquad \phi \leftarrow f \phi,\qquad
     \lambda_{prev} \leftarrow f \lambda

  Returns:
    ``(phi, new recovery norm)`` (the latter float32).
  """
  limit = (count > 0) & (lam > zeta * prev)
  factor = jnp.where(limit, zeta * prev / jnp.where(limit, lam, 1.0), 1.0)
  return phi * factor[..., None], (lam * factor).astype(jnp.float32)


def back_project(frame: _frame.Frame, g: jax.Array, s: jax.Array,
                 w: jax.Array, phi: Optional[jax.Array] = None) -> jax.Array:
  r"""Back-projection :math:`U = S W\ (+\ X\,\mathrm{diag}(\phi))`.

  With recovery, ``W = scale N - c phi P`` and the sum is
  :math:`S(\text{scale}\,N) + (X - c S P)\,\mathrm{diag}(\phi)`, one matmul:
  the ``d x D`` residual is never formed. ``U`` is in the matrix's layout
  (as ``g`` lies).
  """
  return add_recovery(frame, frame.basis_times(s, w), g, phi)


def add_recovery(frame: _frame.Frame, sw: jax.Array, g: jax.Array,
                 phi: Optional[jax.Array] = None) -> jax.Array:
  r""":math:`U = S W + X\,\mathrm{diag}(\phi)` given the product ``S W``: the
  elementwise end of :func:`back_project` (``U = S W`` if ``phi`` is None).

  The sweep applies it where the update is written into its leaf, so that
  XLA fuses it with that write.
  """
  return sw if phi is None else sw + frame.scale_columns(g, phi)
