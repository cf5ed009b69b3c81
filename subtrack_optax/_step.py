"""The update of one projected matrix: its subspace update, then its step.

Everything here sees one matrix: its gradient as it lies (``m x n``; the
subspace update forms its canonical frame ``X``, ``d x D``, inside its
branch), its basis ``S`` (``d x r``, stored dtype), its moments (``r x D``)
and its recovery norm; :mod:`subtrack_optax._engine` sweeps a model's
matrices through :func:`subspace_step` and :func:`regular_step` one at a
time.

1. :func:`subspace_step`: at step 0 the first basis (the top-``r`` left
   singular vectors of ``X``), every ``k`` steps (from the matrix's phase)
   one of the :data:`REFRESH` modes (``grassmann`` tracking, ``svd``,
   ``random``; ``frozen`` keeps the first basis) and the moments moved into
   the new basis; a real branch on the scalar step count
   (:func:`run_if_due`), so a regular step touches no basis and no moment.
2. :func:`regular_step`: projection, Adam in the subspace, recovery of the
   discarded gradient, back-projection (the paper's equations,
   :mod:`subtrack_optax._equations`).

``cfg`` is the transform's :class:`~subtrack_optax._config.Config`, ``frame``
the matrix's :class:`~subtrack_optax._frame.Frame` (its orientation).
"""

import types
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from subtrack_optax import _equations as eq
from subtrack_optax import _frame
from subtrack_optax import _linalg
from subtrack_optax import _sharding
from subtrack_optax import _tracking

__all__ = ["Item", "REFRESH", "branch_index", "run_if_due", "subspace_step",
           "regular_step"]


class Item(NamedTuple):
  """What a refresh mode computes for one matrix (``X``: ``d x D``).

  Attributes:
    basis: the new basis ``(d, r)``, float32.
    change: how the moments move into it: the rank-1 rotation axis ``v``
      ``(r,)`` of a geodesic step (``grassmann``), else the change of basis
      ``C = S'^T S`` ``(r, r)``.
    theta: the rotation angle ``()`` (``grassmann``; 0 where kept).
  """

  basis: jax.Array
  change: jax.Array
  theta: jax.Array


# --------------------------------------------------------- the refreshes --


def _track_one(cfg, count, key, x, s) -> Item:
  """``grassmann``: one rank-1 geodesic step (keeps ``S`` on bad input)."""
  del count, key
  steps = _tracking.grassmann_step_multi([s], [x], cfg.step_size,
                                         cfg.normalize_tracking)
  return Item(steps.bases[0], steps.axes[0], steps.thetas[0])


def _replacing(x, new, old) -> Item:
  """``new`` (``old`` where ``X`` is not finite) and ``C = new^T old``."""
  new = jnp.where(jnp.all(jnp.isfinite(x)), new, old)
  return Item(new, eq.change_of_basis(new, old), jnp.zeros([]))


def _svd_one(cfg, count, key, x, s) -> Item:
  """``svd`` (GaLore): the top-``r`` left singular vectors of ``X``."""
  del count, key
  return _replacing(x, _linalg.top_left_singular_vectors(x, cfg.rank), s)


def _random_one(cfg, count, key, x, s) -> Item:
  """``random`` (GoLore): orthonormalized Gaussians keyed by seed, leaf,
  batch slice and step."""
  key = jax.random.fold_in(key, count)
  draw = _sharding.like(jax.random.normal(key, s.shape, jnp.float32), s)
  return _replacing(x, _linalg.householder_orthonormalize(draw), s)


REFRESH: types.MappingProxyType = types.MappingProxyType({
    "grassmann": _track_one, "svd": _svd_one, "random": _random_one})
# "frozen" keeps the first basis: it has no refresh (see subspace_step).


# ----------------------------------------------------------------- gating --


def branch_index(count: jax.Array, phase, interval: int) -> jax.Array:
  """1 (first basis) at step 0, 2 (refresh) when due, else 0 (nothing).

  A refresh is due at ``count = phase + j * interval``, ``j >= 0``, ``count
  > 0``.
  """
  due = (count >= phase) & ((count - phase) % interval == 0)
  return jnp.where(count == 0, 1, jnp.where(due, 2, 0)).astype(jnp.int32)


def run_if_due(idx: jax.Array, branch_fns: Sequence[Callable], x,
               carry: tuple, differentiable: bool = False) -> tuple:
  """``branch_fns[idx - 1](x, *carry)`` if ``idx > 0``, else ``carry``.

  A ``while_loop`` of zero or one trip on the scalar ``idx`` (a real branch,
  never a select), the branch chosen by a switch inside the loop body.
  Unlike a conditional with an identity branch, which XLA compiles to a copy
  of every operand, a loop that does not run touches nothing: on a regular
  step the basis and moments stay where they are. ``x`` is read in the
  body, not carried. ``differentiable``: a switch with an identity branch
  instead (reverse-mode autodiff cannot go through a ``while_loop``).
  """
  if differentiable:
    keep = lambda x, *carry: tuple(carry)
    return tuple(jax.lax.switch(idx, [keep, *branch_fns], x, *carry))
  trips = (idx > 0).astype(jnp.int32)

  def body(loop):
    i, carry = loop
    if len(branch_fns) == 1:
      carry = branch_fns[0](x, *carry)
    else:
      carry = jax.lax.switch(idx - 1, branch_fns, x, *carry)
    return i + 1, tuple(carry)

  _, carry = jax.lax.while_loop(lambda loop: loop[0] < trips, body,
                                (jnp.zeros([], jnp.int32), tuple(carry)))
  return carry


# ---------------------------------------------------------- the two steps --


def _canonical(frame, x):
  return frame.to_canonical(x.astype(jnp.float32))


def _first(cfg, frame, x, s, mu, nu):
  """Step 0: ``S = top_r SVD(X)`` (the moments are zero: nothing moves)."""
  x = _canonical(frame, x)
  return _linalg.top_left_singular_vectors(x, cfg.rank).astype(s.dtype), mu, nu


def _refresh(cfg, frame, count, key, x, s, mu, nu):
  """The mode's new basis, and the moments transported into it."""
  item = REFRESH[cfg.subspace_update](cfg, count, key, _canonical(frame, x),
                                      s.astype(jnp.float32))
  if cfg.transport is not None:
    rank1 = cfg.subspace_update == "grassmann"
    mu, nu = eq.transport_moments(
        None, None, mu, nu,
        rotation=(item.change, item.theta) if rank1 else None,
        change=None if rank1 else item.change, form=cfg.transport,
        count=count, b1=cfg.b1, b2=cfg.b2)
  return item.basis.astype(s.dtype), mu, nu


def subspace_step(cfg, frame: _frame.Frame, count: jax.Array,
                  key: jax.Array, phase, x: jax.Array, s: jax.Array,
                  mu: jax.Array, nu: jax.Array,
                  differentiable: bool = False) -> tuple:
  """The first basis (step 0) or a refresh (when due at ``phase``).

  ``differentiable`` (the form derivatives are taken of, see
  :func:`subtrack_optax._engine.update_projected`): a switch instead of the
  0/1-trip loop, and the new basis is a function of ``stop_gradient(X)``
  and ``stop_gradient(S)``: derivatives flow through the moment transport
  and the regular step, not through the eigensolvers (which iterate to
  convergence in ``while_loop`` form).

  Args:
    cfg: the transform's config.
    frame: the matrix's orientation.
    count: the step count before this update.
    key: the matrix's key (``random`` mode).
    phase: the step at which this matrix's ``k``-step window starts (0
      without ``stagger``).
    x: the matrix as it lies (its canonical ``X`` is formed inside the
      branch, so a regular step makes no transposed copy).
    s: its basis (stored dtype).
    mu: first moments (stored dtype).
    nu: second moments.

  Returns:
    ``(S, M, V)``, unchanged on a step with nothing due.
  """
  idx = branch_index(count, phase, cfg.update_interval)
  const = jax.lax.stop_gradient if differentiable else (lambda a: a)
  first = lambda x, s, mu, nu: _first(cfg, frame, const(x), const(s), mu, nu)
  if cfg.subspace_update == "frozen":
    return run_if_due(jnp.where(idx == 1, 1, 0), [first], x, (s, mu, nu),
                      differentiable)
  refresh = lambda x, s, mu, nu: _refresh(cfg, frame, count, key, const(x),
                                          const(s), mu, nu)
  return run_if_due(idx, [first, refresh], x, (s, mu, nu), differentiable)


def regular_step(cfg, frame: _frame.Frame, g: jax.Array, basis: jax.Array,
                 mu: jax.Array, nu: jax.Array, prev: jax.Array,
                 count: jax.Array, count_inc: jax.Array) -> tuple:
  r"""Projection, Adam in the subspace, recovery, back-projection.

  .. math::

     P = S^T X,\quad (N, M, V) = \mathrm{Adam}(P, M, V),\quad
     U = \text{scale}\cdot S N + (X - c\,S P)\,\mathrm{diag}(\phi)

  (:mod:`subtrack_optax._equations`). ``g`` is the float32 matrix as it
  lies. Returns ``(SW, phi, M, V, recovery_norm)``: ``U =``
  :func:`~subtrack_optax._equations.add_recovery` ``(frame, SW, g, phi)``
  (``phi`` is None without recovery), in ``g``'s layout, float32; the
  moments float32.
  """
  p = eq.project(frame, g, basis)
  s = basis.astype(jnp.float32)
  n, mu, nu = eq.adam_direction(p, mu.astype(jnp.float32),
                                nu.astype(jnp.float32), count_inc,
                                cfg.b1, cfg.b2, cfg.eps)
  if cfg.recovery is None:
    return frame.basis_times(s, cfg.scale * n), None, mu, nu, prev
  gram_p = None
  if cfg.gram_correction:  # S^T S != I to rounding for a narrow basis
    mm = _linalg.matmul
    gram_p = mm(mm(jnp.swapaxes(s, -1, -2), s), p)
  phi, lam = eq.recovery_gains(n, p, frame.col_sq_norms(g), gram_p,
                               cfg.residual_scale)
  phi, prev = eq.limit_growth(phi, lam, prev, count, cfg.norm_growth_limit)
  c = cfg.residual_scale
  resid = phi[..., None, :] * p
  w = cfg.scale * n - (resid if c == 1.0 else c * resid)
  return frame.basis_times(s, w), phi, mu, nu, prev
