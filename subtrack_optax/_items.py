"""Items: one projected matrix of a model at a time, picked and put back.

A model's projected matrices (every leaf, every batch slice of a scanned
leaf) are *items*. A sweep (:mod:`subtrack_optax._engine`) visits them
in a loop, item ``j`` in iteration ``j``: :func:`pick` copies item ``j``
out (a switch over the leaves, a dynamic index over a leaf's batch slices)
and :func:`put` writes its results back (per leaf, a loop of zero or one
trip on ``leaf == i`` around a dynamic update; a switch would copy every
leaf it passes through).
So a program holds one matrix's code once per sweep, not once per leaf, and
nothing is concatenated or stacked.
"""

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _frame
from subtrack_optax import _sharding

__all__ = ["Leaves", "slice_at", "write_at", "batch_index", "pick", "put",
           "tables", "item_key"]


class Leaves(NamedTuple):
  """Per projected leaf (lists aligned): what the update reads and writes.

  Attributes:
    gs: gradients on input, updates on output (the leaf's shape and dtype).
    bases: ``S`` (``(batch..., d, r)``, the stored dtype).
    mus: first moments ``(batch..., r, D)``.
    nus: second moments.
    prevs: recovery norms ``(batch...)``.
  """

  gs: list
  bases: list
  mus: list
  nus: list
  prevs: list


# ------------------------------------------------------------ pick and put --
# A leaf's arrays have its batch axes in front (the gradient in the order of
# Frame.ordered); item b of a leaf is the slice at the batch multi-index of b.


def slice_at(a: jax.Array, idx: tuple) -> jax.Array:
  """``a[idx]`` for a (possibly empty) tuple of scalar indices."""
  if not idx:
    return a
  n = len(idx)
  out = jax.lax.dynamic_slice(a, idx + (0,) * (a.ndim - n),
                              (1,) * n + a.shape[n:])
  return out.reshape(a.shape[n:])


def write_at(a: jax.Array, idx: tuple, v: jax.Array) -> jax.Array:
  """``a`` with ``a[idx] = v``, in place (``v`` itself if ``idx`` is empty),
  ``v`` laid out as ``a``'s slices."""
  n = len(idx)
  v = _sharding.like_slice(v, a, n)
  if not idx:
    return v
  return jax.lax.dynamic_update_slice(a, v.reshape((1,) * n + v.shape),
                                      idx + (0,) * (a.ndim - n))


def batch_index(frame: _frame.Frame, batch: jax.Array) -> tuple:
  """The multi-index over the leaf's batch axes of flat item ``batch``."""
  shape = frame.plan.batch_shape
  return tuple(jnp.unravel_index(batch, shape)) if shape else ()


def pick(getters: Sequence[Callable], leaf: jax.Array,
         batch: jax.Array) -> tuple:
  """``getters[leaf](batch)``: one item copied out (a switch over the
  leaves; the getters read the arrays they close over)."""
  if len(getters) == 1:
    return getters[0](batch)
  return jax.lax.switch(leaf, list(getters), batch)


def put(setters: Sequence[Callable], carry: tuple, leaf: jax.Array,
        batch: jax.Array, new: tuple) -> tuple:
  """``carry`` with ``carry[leaf] = setters[leaf](carry[leaf], batch, new)``.

  Per leaf ``i`` a loop of ``leaf == i`` trips around its setter (a dynamic
  update): a loop updates its carry in place and one that does not run
  touches nothing, whereas a switch would copy every leaf it passes through.
  The loops count down one scalar, ``t = leaf - i`` (loop ``i`` runs while
  ``t == 0``), so their conditions and decrements are the same code for
  every leaf: compiled once, not once per leaf with ``i`` folded in.
  """
  if len(carry) == 1:
    return (setters[0](carry[0], batch, new),)
  out = []
  t = leaf.astype(jnp.int32)
  for setter, arrays in zip(setters, carry):
    t, arrays = jax.lax.while_loop(
        lambda loop: loop[0] == 0,
        lambda loop, setter=setter: (loop[0] - 1,
                                     setter(loop[1], batch, new)),
        (t, tuple(arrays)))
    t = t - 1
    out.append(arrays)
  return tuple(out)


def tables(frames: Sequence[_frame.Frame]) -> tuple:
  """Per item of ``frames``' leaves: its leaf and its flat batch index."""
  sizes = [math.prod(f.plan.batch_shape) for f in frames]
  leaf_of = np.repeat(np.arange(len(frames)), sizes).astype(np.int32)
  batch_of = np.concatenate([np.arange(n) for n in sizes]).astype(np.int32)
  return sizes, leaf_of, batch_of


def item_key(root: jax.Array, path_hash, batch) -> jax.Array:
  """The key of item ``batch`` of the leaf with ``path_hash``."""
  return jax.random.fold_in(jax.random.fold_in(root, path_hash), batch)
