"""The subspace update: which leaves, when, and how their bases change.

Every ``k`` steps (and at step 0) each projected leaf's basis is replaced:
at step 0 by the top-``r`` left singular vectors of its gradient
(:func:`first_basis`), afterwards by one of the :data:`REFRESH` modes
(``grassmann`` tracking, ``svd``, ``random``; ``frozen`` keeps it); the
moments are then transported into the new basis.

Structure of the program, chosen so that its size and its memory do not grow
with the number of same-shape leaves:

- leaves whose canonical ``(d, D)``, explicit sharding and state dtypes agree
  form a *group* (:func:`group_leaves`); the matrices of a group (every leaf,
  every batch slice of a scanned leaf) are *items*;
- each branch sweeps a group's items with one loop (:func:`sweep`) whose body
  picks item ``j``'s gradient and basis (a switch over the group's leaves,
  then a dynamic index over its batch slices: one matrix is copied, nothing
  is stacked) and computes its new basis: the body's code is traced once per
  group, and only one matrix's temporaries are live at a time; only the new
  bases (``d x r`` each) are collected;
- per leaf, what is left is cheap: unstacking its new bases and transporting
  its moments;
- the update is gated by the scalar step count only (:func:`branch_index`):
  one zero-or-one-trip loop (:func:`run_if_due`) around a switch between the
  first basis and the refresh, so a regular step touches no basis and no
  moment; with ``stagger`` each leaf has its own gate and phase.

``cfg`` is the transform's :class:`~subtrack_optax._config.Config`.
"""

import math
import types
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _equations
from subtrack_optax import _frame
from subtrack_optax import _linalg
from subtrack_optax import _sharding
from subtrack_optax import _tracking

__all__ = ["Leaves", "Item", "Changes", "REFRESH", "first_basis", "refresh",
           "transport", "group_leaves", "sweep", "branch_index",
           "run_if_due", "update_subspaces"]


class Leaves(NamedTuple):
  """The state the subspace update reads and replaces (lists, one per leaf).

  Attributes:
    bases: ``S`` (``(batch..., d, r)``, the stored dtype).
    mus: first moments ``(batch..., r, D)``.
    nus: second moments.
  """

  bases: list
  mus: list
  nus: list


class Item(NamedTuple):
  """What a mode computes for one matrix (``d x D``).

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


def _rank1(cfg) -> bool:
  """Whether the refresh is a rank-1 rotation (moments move by ``v, theta``)."""
  return cfg.subspace_update == "grassmann"


def _empty_change(cfg, shape=()):
  r = cfg.rank
  return jnp.zeros(shape + ((r,) if _rank1(cfg) else (r, r)), jnp.float32)


# ------------------------------------------------- the modes, one matrix --


def _first_one(cfg, count, key, x, s) -> Item:
  """Step 0: the top-``r`` left singular vectors of ``X`` (the moments are
  zero: nothing to transport)."""
  del count, key, s
  return Item(_linalg.top_left_singular_vectors(x, cfg.rank),
              _empty_change(cfg), jnp.zeros([]))


def _track_one(cfg, count, key, x, s) -> Item:
  """``grassmann``: one rank-1 geodesic step (keeps ``S`` on bad input)."""
  del count, key
  steps = _tracking.grassmann_step_multi([s], [x], cfg.step_size,
                                         cfg.normalize_tracking)
  return Item(steps.bases[0], steps.axes[0], steps.thetas[0])


def _replacing(x, new, old) -> Item:
  """``new`` (``old`` where ``X`` is not finite) and ``C = new^T old``."""
  new = jnp.where(jnp.all(jnp.isfinite(x)), new, old)
  return Item(new, _equations.change_of_basis(new, old), jnp.zeros([]))


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
# "frozen" keeps the first basis: its refresh is the identity (see refresh).


# -------------------------------------------------------------- sweeping --


def group_leaves(frames: Sequence[_frame.Frame], gs, leaves: Leaves,
                 stagger: bool) -> list[list[int]]:
  """Indices of the projected leaves, grouped for the sweeps.

  Leaves share a group when their canonical ``(d, D)``, explicit sharding
  and state dtypes agree; with ``stagger`` every leaf is its own group.
  """
  if stagger:
    return [[i] for i in range(len(frames))]
  by_key = {}
  for i, (f, g) in enumerate(zip(frames, gs)):
    key = (f.plan.d, f.plan.big_d, _sharding.sharding_key(f.canonical(g)),
           leaves.bases[i].dtype, leaves.mus[i].dtype, leaves.nus[i].dtype)
    by_key.setdefault(key, []).append(i)
  return list(by_key.values())


def _pick(frames, gs, bases, leaf, batch):
  """Item ``(leaf, batch)``'s canonical ``X`` ``(d, D)`` and ``S`` ``(d, r)``
  (float32): a switch over the leaves, a dynamic index over the batch."""
  def branch(i):
    def fn(b):
      f = frames[i]
      x = jax.lax.dynamic_index_in_dim(f.batched_matrix(gs[i]), b, 0, False)
      s = jax.lax.dynamic_index_in_dim(
          _linalg.flatten_batch(bases[i]), b, 0, False)
      return f.to_canonical(x.astype(jnp.float32)), s.astype(jnp.float32)
    return fn
  if len(frames) == 1:
    return branch(0)(batch)
  return jax.lax.switch(leaf, [branch(i) for i in range(len(frames))], batch)


def sweep(one: Callable[..., Item], cfg, count, frames, gs,
          bases) -> list[Item]:
  """``one`` on every matrix of a group, one at a time: per leaf, its items.

  Returns, per leaf, an :class:`Item` of arrays with the leaf's batch shape
  in front (new bases ``(batch..., d, r)``, changes, angles).
  """
  sizes = [math.prod(f.plan.batch_shape) for f in frames]
  leaf_of = np.repeat(np.arange(len(frames)), sizes).astype(np.int32)
  batch_of = np.concatenate([np.arange(n) for n in sizes]).astype(np.int32)
  hashes = np.repeat([f.plan.path_hash for f in frames], sizes)
  n, d, r = len(leaf_of), frames[0].plan.d, cfg.rank
  root = jax.random.key(cfg.seed)

  def body(j, out):
    leaf, batch = jnp.asarray(leaf_of)[j], jnp.asarray(batch_of)[j]
    x, s = _pick(frames, gs, bases, leaf, batch)
    key = jax.random.fold_in(jax.random.fold_in(
        root, jnp.asarray(hashes, jnp.uint32)[j]), batch)
    item = one(cfg, count, key, x, s)
    return Item(*(jax.lax.dynamic_update_index_in_dim(o, v, j, 0)
                  for o, v in zip(out, item)))

  like = _sharding.leading_axis_sharding(bases[0])
  init = Item(jnp.zeros((n, d, r), jnp.float32, out_sharding=like),
              _empty_change(cfg, (n,)), jnp.zeros((n,), jnp.float32))
  out = jax.lax.fori_loop(0, n, body, init) if n > 1 else body(0, init)
  starts = np.cumsum([0] + sizes)
  return [Item(*(o[a:b].reshape(f.plan.batch_shape + o.shape[1:])
                 for o in out))
          for f, a, b in zip(frames, starts[:-1], starts[1:])]


# ------------------------------------------------------------ the branches --


class Changes(NamedTuple):
  """How each leaf's moments move into its new basis (lists, one per leaf).

  Attributes:
    change: ``v`` ``(batch..., r)`` or ``C`` ``(batch..., r, r)`` (see
      :class:`Item`).
    theta: ``(batch...)``.
  """

  change: list
  theta: list


def _bases_by(one, cfg, count, frames, gs, bases, changes: Changes, groups):
  """New bases (stored dtype) and changes of every leaf, sweeping groups."""
  bases, changes = list(bases), Changes(*(list(c) for c in changes))
  for group in groups:
    got = sweep(one, cfg, count, [frames[i] for i in group],
                [gs[i] for i in group], [bases[i] for i in group])
    for i, item in zip(group, got):
      bases[i] = item.basis.astype(bases[i].dtype)
      changes.change[i], changes.theta[i] = item.change, item.theta
  return bases, changes


def first_basis(cfg, count, frames, gs, bases, changes, groups):
  """Step 0: ``S = top_r SVD(X)`` for every leaf."""
  return _bases_by(_first_one, cfg, count, frames, gs, bases, changes, groups)


def refresh(cfg, count, frames, gs, bases, changes, groups):
  """Step ``t = k, 2k, ...``: the mode's new bases and their changes."""
  if cfg.subspace_update == "frozen":
    return list(bases), changes
  return _bases_by(REFRESH[cfg.subspace_update], cfg, count, frames, gs,
                   bases, changes, groups)


def transport(cfg, count, changes: Changes, mus, nus):
  """The moments of every leaf moved into its new basis."""
  out = [_equations.transport_moments(
      None, None, mu, nu,
      rotation=(change, theta) if _rank1(cfg) else None,
      change=None if _rank1(cfg) else change, form=cfg.transport,
      count=count, b1=cfg.b1, b2=cfg.b2)
         for change, theta, mu, nu in zip(*changes, mus, nus)]
  return [o[0] for o in out], [o[1] for o in out]


# ------------------------------------------------------------------ gating --


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
  The gradients ``x`` are read in the body, not carried.
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


def _gated(cfg, count, frames, groups, phase, gs, leaves: Leaves) -> Leaves:
  """The first basis or a refresh of the ``groups``, if due at ``count``.

  Two gates on the same scalar: the bases (and how the moments are to move)
  are replaced in the first; the moments are transported, in place, in the
  second, which runs on refresh steps only. So no branch ever returns the
  moments unchanged (a copy of them).
  """
  idx = branch_index(count, phase, cfg.update_interval)
  changes = Changes([_empty_change(cfg, f.plan.batch_shape) for f in frames],
                    [jnp.zeros(f.plan.batch_shape) for f in frames])

  def branch(which):
    return lambda gs, bases, changes: which(cfg, count, frames, gs, bases,
                                            Changes(*changes), groups)

  bases, changes = run_if_due(idx, [branch(first_basis), branch(refresh)],
                              gs, (leaves.bases, changes))
  mus, nus = leaves.mus, leaves.nus
  if cfg.transport is not None and cfg.subspace_update != "frozen":
    moved = jnp.where(idx == 2, 1, 0).astype(jnp.int32)
    mus, nus = run_if_due(
        moved, [lambda ch, mus, nus: transport(cfg, count, Changes(*ch), mus,
                                               nus)], changes, (mus, nus))
  return Leaves(list(bases), list(mus), list(nus))


def update_subspaces(cfg, count: jax.Array, frames: Sequence[_frame.Frame],
                     gs: Sequence[jax.Array], leaves: Leaves) -> Leaves:
  """The subspace update of every projected leaf (lists aligned).

  Without ``stagger``: one gate for all leaves. With ``stagger``: one gate
  per leaf, leaf ``i`` of ``n`` at phase ``i k // n`` of the ``k``-step
  window, so that no single step refreshes every leaf.

  Args:
    cfg: the transform's config.
    count: the step count before this update.
    frames: the leaves' frames.
    gs: the gradients as given (each item's canonical frame is formed in
      the sweep).
    leaves: the current bases and moments (compute layout).

  Returns:
    The bases and moments after the update (unchanged on a step with
    nothing due).
  """
  gs, leaves = list(gs), Leaves(*(list(t) for t in leaves))
  if not cfg.stagger:
    groups = group_leaves(frames, gs, leaves, stagger=False)
    return _gated(cfg, count, frames, groups, 0, gs, leaves)
  n = max(len(frames), 1)
  for i in range(len(frames)):
    phase = (i * cfg.update_interval) // n
    got = _gated(cfg, count, [frames[i]], [[0]], phase, [gs[i]],
                 Leaves(*([t[i]] for t in leaves)))
    for t, v in zip(leaves, got):
      t[i] = v[0]
  return leaves
