"""The update of one projected matrix: its subspace update, then its step.

Everything here sees one matrix: its gradient as it lies (``m x n``; the
subspace update sees its canonical ``X``, ``d x D``, only through ``X X^T
Q``, ``||X||`` and, tracking, ``X A^T`` and ``w^T X``, :class:`XOps`, taken
with the matrix as it lies), its
basis ``S`` (``d x r``, stored dtype), its moments (``r x D``) and its
recovery norm; :mod:`subtrack_optax._engine` sweeps a model's
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

import functools
import types
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from subtrack_optax import _equations as eq
from subtrack_optax import _frame
from subtrack_optax import _linalg
from subtrack_optax import _sharding
from subtrack_optax import _tracking

__all__ = ["Item", "XOps", "matrix_ops", "REFRESH", "branch_index",
           "subspace_branch", "run_if_due", "reuses_projection",
           "new_basis", "transport",
           "subspace_step", "regular_step"]


class Item(NamedTuple):
  """What a refresh mode computes for one matrix (``X``: ``d x D``).

  Attributes:
    basis: the new basis ``(d, r)``, float32.
    change: how the moments move into it: the rank-1 rotation axis ``v``
      ``(r,)`` of a geodesic step (``grassmann``), else the change of basis
      ``C = S'^T S`` ``(r, r)``.
    theta: the rotation angle ``()`` (``grassmann``; 0 where kept).
    projection: ``S'^T X`` ``(r, D)`` float32 where the caller passed the
      old projection (:func:`reuses_projection`), else None.
  """

  basis: jax.Array
  change: jax.Array
  theta: jax.Array
  projection: Optional[jax.Array] = None


# ----------------------------------------------- the gradient, as seen --


class XOps(NamedTuple):
  """The gradient matrix ``X`` (``d x D``) as the subspace update sees it:
  only through these functions, so the subspace update's code does not
  depend on ``D`` (the products are the caller's: :func:`matrix_ops` takes
  them with the matrix as it lies).

  Attributes:
    gram: ``(Q, inv) -> inv X (inv X^T Q)`` (``(d, k) -> (d, k)``, float32).
    norm: ``() -> ||X||_F`` (non-finite if ``X`` is).
    project: ``S -> S^T X`` (``(d, r) -> (r, D)``, float32).
    times_transposed: ``A -> X A^T`` (``(r, D) -> (d, r)``).
    row: ``w -> w^T X`` (``(d,) -> (D,)``).
  """

  gram: Callable
  norm: Callable
  project: Callable
  times_transposed: Callable
  row: Callable


def matrix_ops(frame: _frame.Frame, x: jax.Array) -> XOps:
  """:class:`XOps` of one matrix ``x`` as it lies (``m x n``; no copy, no
  transpose: the products are oriented by the frame)."""
  x = x.astype(jnp.float32)
  transposed = not frame.basis_on_rows
  return XOps(
      lambda q, inv: _linalg.gram_apply(x, q, inv, transposed=transposed),
      lambda: _linalg.safe_frobenius_norm(x),
      lambda s: eq.project(frame, x, s),
      lambda a: frame.times_transposed(x, a),
      lambda w: frame.row_times(w, x))


# --------------------------------------------------------- the refreshes --


def _top_basis(cfg, ops: XOps, s, norm) -> jax.Array:
  """``S = `` the top-``r`` left singular vectors of ``X`` (first ``r`` unit
  vectors if ``X`` is not finite)."""
  q0 = _sharding.like(_linalg.start_block(s.shape[-2], cfg.rank), s)
  return _linalg.top_eigvecs_of_gram(ops.gram, norm, q0, cfg.rank)


def _first(cfg, ops, count, key, s, p=None) -> Item:
  """Step 0: the top-``r`` left singular vectors (nothing to transport);
  with ``p`` (the old basis's projection), the new one's ``S^T X``."""
  del count, key
  basis = _top_basis(cfg, ops, s, ops.norm())
  change = (jnp.zeros(s.shape[-1:], jnp.float32)
            if cfg.subspace_update == "grassmann" else jnp.zeros(
                s.shape[-1:] * 2, jnp.float32))
  return Item(basis, change, jnp.zeros([]),
              None if p is None else ops.project(basis))


def _track_one(cfg, ops, count, key, s, p=None) -> Item:
  r"""``grassmann``: one rank-1 geodesic step (keeps ``S`` on bad input).

  With ``p = S^T X`` (the regular step's projection, computed first), the
  gradient enters through one product with ``X`` instead of three:

  .. math::

     Y = X_n X_n^T S = \mathrm{inv}\,X\,(\mathrm{inv}\,P)^T,\qquad
     S'^T X = P + v\,(w^T X)

  (:func:`~subtrack_optax._tracking.rotated_projection`), and the regular
  step takes ``S'^T X`` as its projection.
  """
  del count, key
  norm = ops.norm()
  inv = (_linalg.inverse_or_zero(norm) if cfg.normalize_tracking
         else jnp.ones([]))
  y = (ops.gram(s, inv) if p is None
       else inv * ops.times_transposed(inv * p))
  step = _tracking.geodesic_step(s, y, jnp.isfinite(norm), cfg.step_size)
  return Item(step.basis, step.axis, step.theta,
              None if p is None else _tracking.rotated_projection(
                  p, step, ops.row(step.direction)))


def _replacing(finite, new, old) -> Item:
  """``new`` (``old`` where ``X`` is not finite) and ``C = new^T old``."""
  new = jnp.where(finite, new, old)
  return Item(new, eq.change_of_basis(new, old), jnp.zeros([]))


def _svd_one(cfg, ops, count, key, s, idx=2) -> Item:
  """``svd`` (GaLore): the top-``r`` left singular vectors of ``X`` (at
  ``idx`` 1, the first basis, the unit vectors for a non-finite ``X``)."""
  del count, key
  norm = ops.norm()
  return _replacing(jnp.isfinite(norm) | (idx == 1),
                    _top_basis(cfg, ops, s, norm), s)


def _random_one(cfg, ops, count, key, s) -> Item:
  """``random`` (GoLore): orthonormalized Gaussians keyed by seed, leaf,
  batch slice and step."""
  key = jax.random.fold_in(key, count)
  draw = _sharding.like(jax.random.normal(key, s.shape, jnp.float32), s)
  return _replacing(jnp.isfinite(ops.norm()),
                    _linalg.householder_orthonormalize(draw), s)


REFRESH: types.MappingProxyType = types.MappingProxyType({
    "grassmann": _track_one, "svd": _svd_one, "random": _random_one})
# "frozen" keeps the first basis: it has no refresh (see subspace_branch).


# ----------------------------------------------------------------- gating --


def branch_index(count: jax.Array, phase, interval: int) -> jax.Array:
  """1 (first basis) at step 0, 2 (refresh) when due, else 0 (nothing).

  A refresh is due at ``count = phase + j * interval``, ``j >= 0``, ``count
  > 0``.
  """
  due = (count >= phase) & ((count - phase) % interval == 0)
  return jnp.where(count == 0, 1, jnp.where(due, 2, 0)).astype(jnp.int32)


def subspace_branch(cfg, count: jax.Array, phase) -> jax.Array:
  """:func:`branch_index` of the mode (``frozen`` never refreshes)."""
  idx = branch_index(count, phase, cfg.update_interval)
  return jnp.where(idx == 1, 1, 0) if cfg.subspace_update == "frozen" else idx


def run_if_due(idx: jax.Array, branch_fns: Sequence[Callable], x,
               carry: tuple, differentiable: bool = False) -> tuple:
  """``branch_fns[idx - 1](x, *carry)`` if ``idx > 0``, else ``carry``.

  A ``while_loop`` of zero or one trip on the scalar ``idx`` (a real branch,
  never a select), the branch chosen by a switch inside the loop body.
  Unlike a conditional with an identity branch, which XLA compiles to a copy
  of every operand, a loop that does not run touches nothing: on a regular
  step the basis and moments stay where they are. ``x`` is read in the
  body, not carried, through an optimization barrier with the carry: what
  a branch computes from ``x`` alone is then not loop-invariant, and XLA
  cannot hoist it out of the loop (run it on every step).
  ``differentiable``: a switch with an identity branch
  instead (reverse-mode autodiff cannot go through a ``while_loop``).
  """
  if differentiable:
    keep = lambda x, *carry: tuple(carry)
    return tuple(jax.lax.switch(idx, [keep, *branch_fns], x, *carry))
  trips = (idx > 0).astype(jnp.int32)

  def body(loop):
    i, carry = loop
    # x read through a barrier with the carry: what the branch computes from
    # x alone (an SVD of it) is not loop-invariant, so XLA cannot hoist it
    # out of the loop and run it on every step.
    xb, carry = jax.lax.optimization_barrier((x, carry))
    if len(branch_fns) == 1:
      carry = branch_fns[0](xb, *carry)
    else:
      carry = jax.lax.switch(idx - 1, branch_fns, xb, *carry)
    return i + 1, tuple(carry)

  _, carry = jax.lax.while_loop(lambda loop: loop[0] < trips, body,
                                (jnp.zeros([], jnp.int32), tuple(carry)))
  return carry


# ---------------------------------------------------- the subspace update --


def reuses_projection(cfg, basis_dtype, differentiable: bool = False
                      ) -> bool:
  """Whether the projection ``P = S^T X`` is taken before the subspace
  update and handed to it (``grassmann``: tracking reuses it,
  :func:`_track_one`), rather than after it.

  Not for a basis stored narrower than float32: the step then projects on
  the stored (rounded) basis, not on the float32 rotation. Not in the form
  derivatives are taken of, whose new basis is a constant: there ``S'^T
  X`` is taken anew, so its derivative is ``S'^T dX``.
  """
  return (cfg.subspace_update == "grassmann" and not differentiable
          and jnp.dtype(basis_dtype) == jnp.float32)


def new_basis(cfg, ops: XOps, count: jax.Array, key: jax.Array,
              idx: jax.Array, s: jax.Array,
              p: Optional[jax.Array] = None) -> Item:
  """The first basis (``idx`` 1) or the mode's refresh (``idx`` 2) of one
  matrix seen through ``ops``; ``s`` float32. (Called only where ``idx >
  0``.) In ``svd`` mode both are the same top-``r`` basis: one copy of it
  in the program, the old basis kept on a non-finite refresh. ``p``: the
  old basis's projection, ``grassmann`` only (the :class:`Item` then
  carries the new one's)."""
  if cfg.subspace_update == "frozen":
    return _first(cfg, ops, count, key, s)
  if cfg.subspace_update == "svd":
    return _svd_one(cfg, ops, count, key, s, idx)
  branches = [functools.partial(f, cfg, ops)
              for f in (_first, REFRESH[cfg.subspace_update])]
  args = (count, key, s) if p is None else (count, key, s, p)
  return jax.lax.switch(idx - 1, branches, *args)


def transport(cfg, count: jax.Array, item: Item, mu: jax.Array,
              nu: jax.Array) -> tuple:
  """The moments moved into ``item.basis``
  (:func:`~subtrack_optax._equations.transport_moments`: the rank-1 form
  after a geodesic step, else ``C = S'^T S``); unchanged without transport."""
  if cfg.transport is None:
    return mu, nu
  rank1 = cfg.subspace_update == "grassmann"
  return eq.transport_moments(
      None, None, mu, nu, rotation=(item.change, item.theta) if rank1 else None,
      change=None if rank1 else item.change, form=cfg.transport, count=count,
      b1=cfg.b1, b2=cfg.b2)


def subspace_step(cfg, frame: _frame.Frame, count: jax.Array,
                  key: jax.Array, phase, x: jax.Array, s: jax.Array,
                  mu: jax.Array, nu: jax.Array,
                  differentiable: bool = False,
                  p: Optional[jax.Array] = None) -> tuple:
  """One matrix's first basis (step 0) or refresh (when due at ``phase``),
  and its moments transported (on a refresh).

  Two 0/1-trip loops (:func:`run_if_due`): the new basis
  (:func:`new_basis`) when anything is due, inside it the moment transport
  (:func:`transport`) on a refresh. ``differentiable`` (the form
  derivatives are taken of, see
  :func:`subtrack_optax._engine.update_projected`): switches instead of the
  loops, and the new basis is a function of
  ``stop_gradient(X)`` and ``stop_gradient(S)``: derivatives flow through
  the moment transport and the regular step, not through the eigensolvers
  (which iterate to convergence in ``while_loop`` form).

  Args:
    cfg: the transform's config.
    frame: the matrix's orientation.
    count: the step count before this update.
    key: the matrix's key (``random`` mode).
    phase: the step at which this matrix's ``k``-step window starts (0
      without ``stagger``).
    x: the matrix as it lies.
    s: its basis (stored dtype).
    mu: first moments (stored dtype).
    nu: second moments.
    p: ``S^T X`` (float32) if :func:`reuses_projection`, else None.

  Returns:
    ``(S, M, V, P)``, unchanged on a step with nothing due; ``P`` is the
    new basis's ``S^T X`` if ``p`` was given, else None.
  """
  idx = subspace_branch(cfg, count, phase)
  const = jax.lax.stop_gradient if differentiable else (lambda a: a)

  def due(x, s, mu, nu, p):
    item = new_basis(cfg, matrix_ops(frame, const(x)), count, key, idx,
                     const(s).astype(jnp.float32), p)
    if cfg.transport is not None and cfg.subspace_update != "frozen":
      mu, nu = run_if_due(
          (idx == 2).astype(jnp.int32),
          [lambda _, mu, nu: transport(cfg, count, item, mu, nu)], None,
          (mu, nu), differentiable)
    return item.basis.astype(s.dtype), mu, nu, item.projection

  return run_if_due(jnp.minimum(idx, 1), [due], x, (s, mu, nu, p),
                    differentiable)


def regular_step(cfg, frame: _frame.Frame, g: jax.Array, basis: jax.Array,
                 mu: jax.Array, nu: jax.Array, prev: jax.Array,
                 count: jax.Array, count_inc: jax.Array,
                 p: Optional[jax.Array] = None) -> tuple:
  r"""Projection, Adam in the subspace, recovery, back-projection.

  .. math::

     P = S^T X,\quad (N, M, V) = \mathrm{Adam}(P, M, V),\quad
     U = \text{scale}\cdot S N + (X - c\,S P)\,\mathrm{diag}(\phi)

  (:mod:`subtrack_optax._equations`). ``g`` is the float32 matrix as it
  lies; ``p``, if given, is ``P`` (:func:`reuses_projection`). Returns
  ``(SW, phi, M, V, recovery_norm)``: ``U =``
  :func:`~subtrack_optax._equations.add_recovery` ``(frame, SW, g, phi)``
  (``phi`` is None without recovery), in ``g``'s layout, float32; the
  moments float32.
  """
  if p is None:
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
