"""The sweep: every projected matrix of a model, one at a time.

A model's projected matrices (every leaf, every batch slice of a scanned
leaf) are *items*; leaves whose matrix ``(m, n)``, basis side, sharding and
dtypes agree form a *group* (:func:`group_leaves`). One loop per group
(:func:`sweep_group`) runs, on item ``j`` in iteration ``j``,
:func:`~subtrack_optax._step.subspace_step` (a 0/1-trip loop on the scalar
step count and the item's phase: the first basis or a refresh when due,
nothing otherwise) and then :func:`~subtrack_optax._step.regular_step`:

- the loop carries the group's leaves themselves (gradients, bases,
  moments, recovery norms; the state is donated, the gradients are the
  transform's input), and each item's update is written over its gradient:
  the update tree is written in place of the gradient tree;
- :func:`~subtrack_optax._items.pick` copies item ``j`` out (a switch over
  the group's leaves, a dynamic index over a leaf's batch slices),
  :func:`~subtrack_optax._items.put` writes its results
  back (per leaf, a loop of zero or one trip on ``leaf == i`` around a
  dynamic update; a switch would copy every leaf it passes through);
- so the program holds one matrix's update once per group, not once per
  leaf, only one matrix's temporaries are live at a time whatever the
  depth, and nothing is concatenated or stacked.
"""

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _equations
from subtrack_optax import _frame
from subtrack_optax import _items
from subtrack_optax import _sharding
from subtrack_optax import _step

__all__ = ["group_leaves", "sweep_group", "sweep_unrolled",
           "update_projected"]

Leaves = _items.Leaves


def _grouped(keys) -> list[list[int]]:
  """Indices with equal keys, each list in reverse order.

  Reverse tree order: then XLA's buffer assigner (jax 0.10.2, CPU, its
  default concurrency-optimized schedule) writes every leaf's update, and
  whatever the chain applies to it next (a learning rate), in place of the
  leaf's gradient; in tree order it misses about half of them, and each
  miss is a gradient-sized temporary (60m tree, ``chain(clip, ...)``:
  docs/performance.md). The order of the items changes no result.
  """
  by_key = {}
  for i, key in enumerate(keys):
    by_key.setdefault(key, []).append(i)
  return [members[::-1] for members in by_key.values()]


def group_leaves(frames: Sequence[_frame.Frame],
                 leaves: Leaves) -> list[list[int]]:
  """Leaves whose matrices ``(m, n)``, basis side, explicit sharding and
  dtypes agree (one regular-step loop each)."""
  return _grouped(
      (f.plan.m, f.plan.n, f.plan.basis_on_reduction,
       _sharding.sharding_key(f.ordered(g)), g.dtype, s.dtype,
       mu.dtype, nu.dtype, p.dtype)
      for f, g, s, mu, nu, p in zip(frames, *leaves))


def _get(f: _frame.Frame, arrays: tuple, b: jax.Array) -> tuple:
  """Item ``b`` of a leaf: its matrix as it lies, and its state (stored
  layout)."""
  idx = _items.batch_index(f, b)
  g, *state = (_items.slice_at(a, idx) for a in arrays)
  return (f.item_matrix(g), *state)


def _gathered(f: _frame.Frame, item: tuple) -> tuple:
  """The item with its basis and moments gathered along their stored
  ``r``-axis shards under explicit sharding (a no-op otherwise;
  :func:`~subtrack_optax._sharding.to_compute_layout`); :func:`_set`
  writes them back in the stored layout.

  One item at a time, after :func:`~subtrack_optax._items.pick`: gathering
  every leaf's state before the sweeps kept all of it gathered at once, and
  a gather inside each of the pick's branches got a buffer per leaf (the 1B
  update on 16 TPU chips: 2.4 and 1.4 GiB of temporaries,
  docs/sharding.md).
  """
  x, s, mu, nu, prev = item
  s, mu, nu = _sharding.to_compute_layout(f.to_canonical(x), s, mu, nu)
  return x, s, mu, nu, prev


def _set(f: _frame.Frame, arrays: tuple, b: jax.Array, new: tuple) -> tuple:
  """``arrays`` with item ``b``'s update written over its gradient and its
  new state over its state.

  The update's last, elementwise part is formed here, from the gradient in
  ``arrays``, where it is written: XLA fuses it with the write (no copy of
  ``U``; inside the sweep's loop it is not loop-invariant).
  """
  sw, phi, *state = new
  idx = _items.batch_index(f, b)
  x = f.item_matrix(_items.slice_at(arrays[0], idx))
  u = _equations.add_recovery(f, sw, x.astype(jnp.float32), phi)
  values = (f.item_unmatrix(u.astype(x.dtype)), *state)
  return tuple(_items.write_at(a, idx, v) for a, v in zip(arrays, values))


def _item_step(cfg, frame: _frame.Frame, count, count_inc, key, phase,
               item: tuple, differentiable: bool = False) -> tuple:
  """One matrix: its subspace step, then its regular step; returns what
  :func:`_set` writes (``SW, phi`` and the new state, stored dtypes).

  Where :func:`~subtrack_optax._step.reuses_projection` (``grassmann``, a
  float32 basis), ``P = S^T X`` is taken first and handed through the
  subspace step (a tracking step updates it to ``S'^T X``) to the regular
  step; otherwise the regular step takes it on the basis as it is then."""
  x, s, mu, nu, prev = item
  x32 = x.astype(jnp.float32)
  p = (_equations.project(frame, x32, s)
       if _step.reuses_projection(cfg, s.dtype, differentiable) else None)
  s, mu_t, nu_t, p = _step.subspace_step(cfg, frame, count, key, phase, x, s,
                                         mu, nu, differentiable, p)
  sw, phi, mu_new, nu_new, prev_new = _step.regular_step(
      cfg, frame, x32, s, mu_t, nu_t, prev, count, count_inc, p)
  return (sw, phi, s, mu_new.astype(mu.dtype), nu_new.astype(nu.dtype),
          prev_new.astype(jnp.float32))


def sweep_group(cfg, count: jax.Array, count_inc: jax.Array,
                frames: Sequence[_frame.Frame], phases: Sequence[int],
                leaves: Leaves) -> Leaves:
  """One matrix at a time, every item of a group: its subspace step
  (:func:`~subtrack_optax._step.subspace_step`, a 0/1-trip loop that runs
  only when the item is due), then its regular step
  (:func:`~subtrack_optax._step.regular_step`).

  The loop carries each leaf's gradient and state;
  :func:`~subtrack_optax._items.put` writes each
  item's update over its gradient.

  Args:
    cfg: the transform's config.
    count: the step count before this update.
    count_inc: the count after it.
    frames: the group's leaves' frames.
    phases: each leaf's phase in the ``k``-step window.
    leaves: the group's leaves (gradients as given, state as stored).

  Returns:
    The group's updates (each leaf's shape and dtype) and new state.
  """
  sizes, leaf_of, batch_of = _items.tables(frames)
  hashes = np.repeat([f.plan.path_hash for f in frames], sizes)
  # Phases are Python ints (a constant table), or traced if update_interval
  # is injected (optax.inject_hyperparams).
  phase_of = (np.repeat(np.asarray(phases, np.int32), sizes)
              if all(isinstance(p, int) for p in phases) else
              jnp.repeat(jnp.asarray(phases, jnp.int32), np.asarray(sizes)))
  root, frame = jax.random.key(cfg.seed), frames[0]

  def body(j, carry):
    leaf, batch = jnp.asarray(leaf_of)[j], jnp.asarray(batch_of)[j]
    item = _gathered(frame, _items.pick(
        [functools.partial(_get, f, a) for f, a in zip(frames, carry)],
        leaf, batch))
    key = _items.item_key(root, jnp.asarray(hashes, jnp.uint32)[j], batch)
    new = _item_step(cfg, frame, count, count_inc, key,
                     jnp.asarray(phase_of)[j], item)
    return _items.put([functools.partial(_set, f) for f in frames], carry,
                      leaf, batch, new)

  carry = tuple((f.ordered(g), s, mu, nu, p) for f, g, s, mu, nu, p in
                zip(frames, *leaves))
  carry = jax.lax.fori_loop(0, len(leaf_of), body, carry)
  return Leaves([f.unordered(c[0]) for f, c in zip(frames, carry)],
                *([c[k] for c in carry] for k in range(1, 5)))


def sweep_unrolled(cfg, count: jax.Array, count_inc: jax.Array,
                   frames: Sequence[_frame.Frame], phases: Sequence[int],
                   leaves: Leaves) -> Leaves:
  """The same update as the groups' sweeps, each item traced on its own
  and no loop or 0/1-trip gate anywhere (see
  :func:`~subtrack_optax._step.subspace_step`'s ``differentiable``): the
  form whose derivatives :func:`update_projected` returns (reverse-mode
  autodiff cannot go through a ``while_loop``)."""
  root = jax.random.key(cfg.seed)
  out = Leaves([], [], [], [], [])
  for f, phase, g, s, mu, nu, p in zip(frames, phases, *leaves):
    arrays = (f.ordered(g), s, mu, nu, p)
    for b in range(math.prod(f.plan.batch_shape)):
      b = jnp.int32(b)
      key = _items.item_key(root, jnp.uint32(f.plan.path_hash), b)
      new = _item_step(cfg, f, count, count_inc, key, phase,
                       _gathered(f, _get(f, arrays, b)), differentiable=True)
      arrays = _set(f, arrays, b, new)
    for t, a in zip(out, (f.unordered(arrays[0]), *arrays[1:])):
      t.append(a)
  return out


def _sweeps(cfg, count, count_inc, frames, phases, leaves) -> Leaves:
  """Every group's sweep (:func:`sweep_group`), results in leaf order.

  The gradients pass an optimization barrier first: in a train step XLA
  otherwise reduced each gradient that the sweeps read whole across the
  batch's devices (an all-reduce, then this device's slice) instead of
  reduce-scattering it (XLA:TPU, the 7B shapes on 256 chips: every MLP
  gradient; docs/sharding.md).
  """
  leaves = leaves._replace(
      gs=list(jax.lax.optimization_barrier(tuple(leaves.gs))))
  out = Leaves(*(list(t) for t in leaves))
  for members in group_leaves(frames, leaves):
    got = sweep_group(cfg, count, count_inc, [frames[i] for i in members],
                      [phases[i] for i in members],
                      Leaves(*([t[i] for i in members] for t in leaves)))
    for t, v in zip(out, got):
      for i, a in zip(members, v):
        t[i] = a
  return out


def update_projected(cfg, count: jax.Array, count_inc: jax.Array,
                     frames: Sequence[_frame.Frame], leaves: Leaves) -> Leaves:
  """The update of every projected leaf (lists aligned with ``frames``).

  With ``stagger``, leaf ``i`` of ``n`` has phase ``i k // n`` in the
  ``k``-step window, so that no single step refreshes every leaf.

  Values come from the groups' sweeps (:func:`sweep_group`: loops and
  0/1-trip gates). Derivatives (``jax.grad``, ``jax.jvp``, ``jax.jacfwd``
  through the update, e.g. to meta-learn hyperparameters) are those of
  :func:`sweep_unrolled`, the same update without loops or gates (a
  :func:`jax.custom_jvp`; reverse mode cannot go through a ``while_loop``).
  On a step that computes a new basis the derivative treats that basis as
  a constant (it flows through the moment transport and the regular step,
  not the eigensolvers); on every other step it is exact.

  Args:
    cfg: the transform's config.
    count: the step count before this update.
    count_inc: the count after it.
    frames: the leaves' frames.
    leaves: the gradients (as given) and the state (as stored).

  Returns:
    The updates (each leaf's shape and dtype) and the new state.
  """
  n, k = max(len(frames), 1), cfg.update_interval
  phases = [(i * k) // n if cfg.stagger else 0 for i in range(len(frames))]
  with_hyper = lambda hyper: dataclasses.replace(cfg, **hyper)

  @jax.custom_jvp
  def update(count, count_inc, leaves, hyper):
    return _sweeps(with_hyper(hyper), count, count_inc, frames, phases,
                   leaves)

  @update.defjvp
  def update_jvp(primals, tangents):
    unrolled = lambda count, count_inc, leaves, hyper: sweep_unrolled(
        with_hyper(hyper), count, count_inc, frames, phases, leaves)
    _, out_tangents = jax.jvp(unrolled, primals, tangents)
    return update(*primals), out_tangents

  # Traced options are arguments, not closed-over values: derivatives with
  # respect to them (injected hyperparameters) are taken, not refused.
  return update(count, count_inc, leaves, cfg.traced_hyperparameters())
