"""``list_leaves``: how a transformation treats every parameter leaf."""

import math
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from subtrack_optax import _state
from subtrack_optax import _variables
from subtrack_optax._state import SubTrackState

__all__ = ["LeafInfo", "LeafList", "list_leaves"]


class LeafInfo(NamedTuple):
  """One parameter leaf as a :func:`subtrack` sees it.

  Attributes:
    path: the leaf's key path.
    shape: the leaf's shape.
    projected: whether it gets the low-rank update (else plain Adam).
    why: for a dense leaf, why (``"not a matrix"``, ``"m x n matrix, a side
      <= rank r"``, ``"dimension_numbers: dense"``, ...); ``""`` if projected.
    d: the basis side (0 if dense).
    big_d: the other side ``D`` (0 if dense).
    rank: ``r`` (0 if dense).
    matrices: how many matrices the leaf holds (its batch slices).
    state_bytes: bytes of its optimizer state (moments, basis, recovery).
    adam_bytes: bytes Adam's two moments would take for it.
  """

  path: str
  shape: tuple
  projected: bool
  why: str
  d: int
  big_d: int
  rank: int
  matrices: int
  state_bytes: int
  adam_bytes: int


class LeafList(tuple):
  """A tuple of :class:`LeafInfo` that prints as a table with totals."""

  def __str__(self) -> str:
    rows = [("leaf", "shape", "handling", "d x D, r", "state", "adam")]
    for x in self:
      rows.append((
          x.path, "x".join(map(str, x.shape)) or "()",
          f"projected x{x.matrices}" if x.projected else f"dense: {x.why}",
          f"{x.d} x {x.big_d}, {x.rank}" if x.projected else "",
          _size(x.state_bytes), _size(x.adam_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in rows]
    state = sum(x.state_bytes for x in self)
    adam = sum(x.adam_bytes for x in self)
    lines.append(
        f"{sum(x.projected for x in self)} of {len(self)} leaves projected; "
        f"optimizer state {_size(state)} ({state / max(adam, 1):.2f} of "
        f"Adam's {_size(adam)})")
    return "\n".join(lines)


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} B"


def _bytes(x) -> int:
  return 0 if isinstance(x, optax.MaskedNode) else (
      math.prod(x.shape) * np.dtype(x.dtype).itemsize)


def _infos(state: SubTrackState) -> list:
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  fields = [jax.tree.leaves(f, is_leaf=is_masked)
            for f in (state.mu, state.nu, state.basis, state.recovery_norm)]
  out = []
  for plan, mu, nu, basis, rec in zip(state.plans.leaves, *fields):
    adam = 2 * math.prod(plan.shape) * np.dtype(nu.dtype).itemsize
    out.append(LeafInfo(
        plan.path, plan.shape, plan.projected, plan.why,
        plan.d if plan.projected else 0,
        plan.big_d if plan.projected else 0, plan.rank,
        math.prod(plan.batch_shape) if plan.projected else 0,
        sum(map(_bytes, (mu, nu, basis, rec))), adam))
  return out


def list_leaves(tx: Any, params: Any) -> LeafList:
  """How ``tx``'s :func:`subtrack` treats each leaf of ``params``.

  ``tx.init`` is traced abstractly (:func:`jax.eval_shape`: nothing is
  allocated). Works for a ``subtrack`` inside any chain, ``optax.masked``,
  ``optax.partition``, ``optax.inject_hyperparams`` ...; leaves that no
  ``subtrack`` sees are not listed.

  Args:
    tx: an optax transformation containing :func:`subtrack`.
    params: the parameters (arrays, :class:`jax.ShapeDtypeStruct` objects
      or Flax NNX variables).

  Returns:
    A :class:`LeafList` (a tuple of :class:`LeafInfo`, in flattening order)
    whose ``str`` is a table with the totals.

  Example:
    >>> import jax.numpy as jnp, subtrack_optax as st
    >>> params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((128,))}
    >>> leaves = st.list_leaves(st.subtrack(rank=8), params)
    >>> [(x.path, x.projected, x.why) for x in leaves]
    [("['b']", False, 'not a matrix'), ("['w']", True, '')]
    >>> leaves[1].d, leaves[1].big_d, leaves[1].rank
    (64, 128, 8)
  """
  init = tx.init if hasattr(tx, "init") else tx
  state = jax.eval_shape(init, _variables.unbox(params))
  found = _state.subtrack_states(state)
  if not found:
    raise ValueError("list_leaves: tx contains no subtrack transformation")
  return LeafList(info for s in found for info in _infos(s))
