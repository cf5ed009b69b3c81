"""The subspace update: which leaves, when, and how their bases change.

Every ``k`` steps (and at step 0) each projected leaf's basis is replaced:
at step 0 by the top-``r`` left singular vectors of its gradient
(:func:`first_basis`), afterwards by one of the :data:`REFRESH` modes
(``grassmann`` tracking, ``svd``, ``random``, ``frozen``); the moments are
then transported into the new basis and the projections ``P = S^T X``
recomputed (or updated in ``O(d D)`` by the tracking step).

Structure of the program:

- leaves of one canonical shape, dtypes and sharding form a *group*
  (:func:`group_leaves`); each branch runs its loops once per group (the ``r x r``
  factorizations of the group are stacked), so compile time does not grow
  with the number of same-shape leaves;
- the update is gated by the scalar step count only (:func:`branch_index`):
  one zero-or-one-trip loop (:func:`run_if_due`) around a switch between the
  first basis and the refresh, so a regular step touches no basis; with
  ``stagger`` each leaf has its own gate and phase.

``cfg`` is the transform's :class:`~subtrack_optax._config.Config`.
"""

from __future__ import annotations

import math
import types
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _equations
from subtrack_optax import _frame
from subtrack_optax import _linalg
from subtrack_optax import _sharding
from subtrack_optax import _tracking

__all__ = ["Slot", "REFRESH", "first_basis", "refresh", "group_leaves",
           "run_groups", "branch_index", "run_if_due", "update_subspaces"]


class Slot(NamedTuple):
  """What the subspace update reads and replaces for one projected leaf.

  Attributes:
    basis: ``S`` (``(batch..., d, r)``, the stored dtype).
    mu: first moments ``(batch..., r, D)``.
    nu: second moments.
    p: the projection ``S^T X`` (float32).
  """

  basis: jax.Array
  mu: jax.Array
  nu: jax.Array
  p: jax.Array


class NewBases(NamedTuple):
  """A refresh mode's result for a group (lists aligned with the group).

  Attributes:
    bases: the new bases (float32).
    rotations: ``(axis, theta)`` of a rank-1 step per leaf, or ``None``s.
    projections: ``S'^T X`` per leaf, or ``None`` to recompute them.
    guarded: True if the mode already kept the old basis where ``X`` is
      not finite.
  """

  bases: list
  rotations: list
  projections: list | None
  guarded: bool


# ------------------------------------------------------------- the modes --


def _track(cfg, frames, count, xs, olds, slots) -> NewBases:
  """``grassmann``: one rank-1 geodesic step (X taken as the leaf lies)."""
  del count
  steps = _tracking.grassmann_step_multi(
      olds, [f.own(x) for f, x in zip(frames, xs)], cfg.step_size,
      cfg.normalize_tracking, projections=[sl.p for sl in slots],
      transposed=[not f.basis_on_rows for f in frames])
  return NewBases(steps.bases, list(zip(steps.axes, steps.thetas)),
                  steps.projections, True)


def _svd(cfg, frames, count, xs, olds, slots) -> NewBases:
  """``svd`` (GaLore): the top-``r`` left singular vectors of ``X``."""
  del frames, count, slots
  return NewBases(_linalg.top_left_singular_vectors_multi(xs, cfg.rank),
                  [None] * len(olds), None, False)


def _random(cfg, frames, count, xs, olds, slots) -> NewBases:
  """``random`` (GoLore): orthonormalized Gaussians keyed by seed, path, step."""
  del xs, slots
  draws = []
  for f in frames:
    key = jax.random.fold_in(jax.random.key(cfg.seed), f.plan.path_hash)
    key = jax.random.fold_in(key, count)
    draws.append(jax.random.normal(
        key, (math.prod(f.plan.batch_shape), f.plan.d, cfg.rank),
        jnp.float32))
  q = _linalg.householder_orthonormalize(jnp.concatenate(draws))
  q = jnp.split(q, np.cumsum([len(g) for g in draws])[:-1])
  return NewBases([qi.reshape(s.shape) for qi, s in zip(q, olds)],
                  [None] * len(olds), None, False)


REFRESH: types.MappingProxyType = types.MappingProxyType({
    "grassmann": _track, "svd": _svd, "random": _random})
# "frozen" keeps the first basis: its refresh is the identity (see refresh).


# ------------------------------------------------------------ the branches --


def first_basis(cfg, frames, count, xs, slots) -> list[Slot]:
  """Step 0: ``S = top_r SVD(X)``, moments unchanged, ``P = S^T X``."""
  del frames, count
  news = _linalg.top_left_singular_vectors_multi(xs, cfg.rank)
  news = [n.astype(sl.basis.dtype) for n, sl in zip(news, slots)]
  return [sl._replace(basis=n, p=_frame.reproject(n, x, sl.p))
          for n, x, sl in zip(news, xs, slots)]


def refresh(cfg, frames, count, xs, slots) -> list[Slot]:
  """Step ``t = k, 2k, ...``: the mode's new basis, transported moments."""
  if cfg.subspace_update == "frozen":
    return list(slots)
  olds = [sl.basis.astype(jnp.float32) for sl in slots]
  new = REFRESH[cfg.subspace_update](cfg, frames, count, xs, olds, slots)
  out = []
  for x, old, s, rot, sl in zip(xs, olds, new.bases, new.rotations, slots):
    if not new.guarded:
      finite = jnp.all(jnp.isfinite(x), axis=(-2, -1))[..., None, None]
      s = jnp.where(finite, s, old)
    mu, nu = sl.mu, sl.nu
    if cfg.transport is not None:
      mu, nu = _equations.transport_moments(
          s, old, mu, nu, rotation=rot, form=cfg.transport, count=count,
          b1=cfg.b1, b2=cfg.b2)
    out.append(Slot(s.astype(sl.basis.dtype), mu, nu, sl.p))
  if new.projections is None or cfg.gram_correction:
    # A basis stored narrower than float32 is rounded after the step:
    # project on what is stored, so P and the back-projection agree.
    return [sl._replace(p=_frame.reproject(sl.basis, x, sl.p))
            for sl, x in zip(out, xs)]
  return [sl._replace(p=p) for sl, p in zip(out, new.projections)]


# ------------------------------------------------------ groups and gating --


def group_leaves(frames: Sequence[_frame.Frame], gs, slots,
                 stagger: bool) -> list[list[int]]:
  """Indices of the projected leaves, grouped for the branches.

  Leaves share a group when their canonical ``(d, D)``, explicit sharding
  and state dtypes agree (one traced copy of the loops per group); with
  ``stagger`` every leaf is its own group.
  """
  if stagger:
    return [[i] for i in range(len(frames))]
  by_key = {}
  for i, (f, g, sl) in enumerate(zip(frames, gs, slots)):
    key = (f.plan.d, f.plan.big_d, _sharding.sharding_key(f.canonical(g)),
           sl.basis.dtype, sl.mu.dtype, sl.nu.dtype)
    by_key.setdefault(key, []).append(i)
  return list(by_key.values())


def run_groups(branch, cfg, count, frames, gs, slots, groups) -> list[Slot]:
  """``branch`` on every group of leaves: the new slots.

  The canonical frame is formed here, inside the branch, so a step that
  does not update the subspace never copies a transposed leaf.
  """
  xs = [f.canonical(g) for f, g in zip(frames, gs)]
  out = list(slots)
  for group in groups:
    got = branch(cfg, [frames[j] for j in group], count,
                 [xs[j] for j in group], [slots[j] for j in group])
    for j, sl in zip(group, got):
      out[j] = sl
  return out


def branch_index(count: jax.Array, phase: int, interval: int) -> jax.Array:
  """1 (first basis) at step 0, 2 (refresh) when due, else 0 (nothing)."""
  due = (count >= phase) & ((count - phase) % interval == 0)
  return jnp.where(count == 0, 1, jnp.where(due, 2, 0)).astype(jnp.int32)


def run_if_due(idx, branch_fns, x, carry):
  """``branch_fns[idx - 1](x, *carry)`` if ``idx > 0``, else ``carry``.

  A ``while_loop`` of zero or one trip on the scalar ``idx`` (a real branch,
  never a select), the branch chosen by a switch inside the loop body.
  Unlike a conditional with an identity branch, which XLA compiles to a copy
  of every operand, a loop that does not run touches nothing: on a regular
  step the bases and moments stay where they are (updated in place when the
  state is donated), and only a step that updates the subspace pays for it.
  """
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


def _gated(cfg, count, frames, groups, phase, gs, slots):
  """The first basis or a refresh of the ``groups``, if due at ``count``."""
  def branch(which):
    return lambda gs, *slots: run_groups(which, cfg, count, frames, gs, slots,
                                         groups)

  return run_if_due(branch_index(count, phase, cfg.update_interval),
                    [branch(first_basis), branch(refresh)], gs, slots)


def update_subspaces(cfg, count: jax.Array, frames: Sequence[_frame.Frame],
                     gs: Sequence[jax.Array],
                     slots: Sequence[Slot]) -> list[Slot]:
  """The subspace update of every projected leaf (lists aligned).

  Without ``stagger``: one gate for all leaves. With ``stagger``: one gate
  per leaf, leaf ``i`` of ``n`` at phase ``i k // n`` of the ``k``-step
  window, so that no single step refreshes every leaf.

  Args:
    cfg: the transform's config.
    count: the step count before this update.
    frames: the leaves' frames.
    gs: the gradients as given (each branch forms their canonical frame).
    slots: the current bases, moments and projections.

  Returns:
    The slots after the update (unchanged on a step with nothing due).
  """
  gs, slots = list(gs), list(slots)
  if not cfg.stagger:
    groups = group_leaves(frames, gs, slots, stagger=False)
    return list(_gated(cfg, count, frames, groups, 0, gs, slots))
  n = max(len(frames), 1)
  for i in range(len(frames)):
    phase = (i * cfg.update_interval) // n
    (slots[i],) = _gated(cfg, count, [frames[i]], [[0]], phase, [gs[i]],
                         [slots[i]])
  return slots
