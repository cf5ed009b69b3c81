"""Leaf plans: which axes of each leaf form the projected matrix.

A matrix leaf is viewed as ``(batch..., m, n)``: ``m`` is the product of the
reduction axes, ``n`` of the output axes, every other axis is a batch axis
whose slices are independent matrices. The basis spans one side (``d``
rows); the canonical frame ``X`` is ``(batch..., d, D)`` (formed by
:class:`subtrack_optax._frame.Frame`). A :class:`LeafPlan` is static (not a
pytree) and :class:`Plans` carries a whole tree of them in the state.
"""

import dataclasses
import math
import zlib
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SubTrackDimensionNumbers",
    "LeafPlan",
    "Plans",
    "is_plan",
    "resolve_plans",
    "dense_warning",
]

AxisSpec = Union[int, Sequence[int]]


class SubTrackDimensionNumbers(NamedTuple):
  """Axes of a leaf that form the matrix to project.

  Every axis that is neither a reduction nor an output axis is a batch axis:
  each batch slice is its own matrix with its own basis and moments (for
  example the layer axis ``L`` of scanned layers ``(L, m, n)``).

  Attributes:
    reduction_axis: int or tuple of ints (negative allowed): the input side
      of the matrix, ``m = prod(shape[reduction_axis])``. Default ``-2``.
    output_axis: int or tuple of ints: the output side,
      ``n = prod(shape[output_axis])``. Default ``-1``: with no arguments
      the spec is the default rule's (the last two axes form the matrix,
      leading axes are batch axes, e.g. scanned layers ``(L, m, n)``).

  Example:
    >>> import subtrack_optax as st
    >>> # a 3-D attention query kernel (embed, heads, head_dim)
    >>> spec = st.SubTrackDimensionNumbers(reduction_axis=0,
    ...                                    output_axis=(1, 2))
  """

  reduction_axis: AxisSpec = -2
  output_axis: AxisSpec = -1


# The default rule's spec (the no-argument spec is the same).
_DEFAULT = SubTrackDimensionNumbers()


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static description of how one leaf is handled (not a pytree)."""

  path: str
  shape: tuple[int, ...]
  projected: bool
  batch_axes: tuple[int, ...] = ()
  reduction_axes: tuple[int, ...] = ()
  output_axes: tuple[int, ...] = ()
  m: int = 0
  n: int = 0
  basis_on_reduction: bool = True
  rank: int = 0
  # Not part of the geometry (equality, hashing): why a leaf is dense, and
  # whether the user's dimension_numbers named this leaf a matrix.
  why: str = dataclasses.field(default="", compare=False)
  named: bool = dataclasses.field(default=False, compare=False)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def d(self) -> int:
    return self.m if self.basis_on_reduction else self.n

  @property
  def big_d(self) -> int:
    return self.n if self.basis_on_reduction else self.m

  @property
  def path_hash(self) -> int:
    return zlib.crc32(self.path.encode()) & 0x7FFFFFFF


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, SubTrackDimensionNumbers)


def _axes(spec: AxisSpec, ndim: int, name: str, path: str) -> tuple[int, ...]:
  if isinstance(spec, (int, np.integer)):
    axes = (spec,)
  elif isinstance(spec, (tuple, list)):
    axes = tuple(spec)
  else:
    raise TypeError(f"dimension_numbers.{name} for leaf {path} must be an int "
                    f"or a tuple of ints, got {spec!r}")
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
      raise TypeError(
          f"dimension_numbers.{name} for leaf {path} must be ints, got {a!r}")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"dimension_numbers.{name}={spec!r} names axis {a}, but leaf {path} "
          f"has only {ndim} axes")
    out.append(int(a) % ndim)
  if not out:
    raise ValueError(
        f"dimension_numbers.{name} for leaf {path} names no axis")
  if len(set(out)) != len(out):
    raise ValueError(
        f"dimension_numbers.{name}={spec!r} repeats an axis for leaf {path}")
  return tuple(out)


def _leaf_plan(path: str, leaf, spec, rank: int, basis_side: str,
               strict: bool) -> LeafPlan:
  shape = tuple(int(s) for s in jnp.shape(leaf))
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
        f"subtrack got leaf {path} of dtype {dtype}: only floating (and "
        "complex, treated as dense) leaves are supported; mask integer leaves "
        "out with optax.masked or optax.partition")
  dense = lambda why: LeafPlan(path=path, shape=shape, projected=False,
                               why=why, named=strict and spec is not None)
  # Complex leaves and empty ones (a zero-size axis) get dense Adam.
  if spec is None:
    return dense("dimension_numbers: dense")
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return dense("complex dtype")
  if 0 in shape:
    return dense("empty")
  if not strict and len(shape) < 2:
    return dense("not a matrix")
  ndim = len(shape)
  red = _axes(spec.reduction_axis, ndim, "reduction_axis", path)
  out = _axes(spec.output_axis, ndim, "output_axis", path)
  if set(red) & set(out):
    raise ValueError(
        f"dimension_numbers for leaf {path}: reduction_axis {spec.reduction_axis!r} "
        f"and output_axis {spec.output_axis!r} share an axis")
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  m = math.prod(shape[a] for a in red)
  n = math.prod(shape[a] for a in out)
  if min(m, n) <= rank:
    return dense(f"{m} x {n} matrix, a side <= rank {rank}")
  if basis_side == "small":
    on_red = m <= n
  else:
    on_red = m >= n
  return LeafPlan(path=path, shape=shape, projected=True, batch_axes=batch,
                  reduction_axes=red, output_axes=out, m=m, n=n,
                  basis_on_reduction=on_red, rank=rank, named=strict)


def resolve_plans(tree, dimension_numbers, rank: int, basis_side: str):
  """A pytree of :class:`LeafPlan` with the structure of ``tree``.

  Args:
    tree: parameters (or updates, or shape structs).
    dimension_numbers: ``None`` (default rule: ``ndim >= 2`` leaves are
      matrices over their last two axes), one :class:`SubTrackDimensionNumbers`
      for every leaf with ``ndim >= 2``, a pytree prefix of ``tree`` whose
      leaves are specs or ``None`` (dense), or a callable ``tree -> that``.
    rank: the projection rank.
    basis_side: ``"small"`` or ``"large"``.
  """
  specs = dimension_numbers(tree) if callable(dimension_numbers) else (
      dimension_numbers)
  with_path = jax.tree_util.tree_map_with_path

  if specs is None or isinstance(specs, SubTrackDimensionNumbers):
    spec = _DEFAULT if specs is None else specs
    return with_path(
        lambda p, x: _leaf_plan(jax.tree_util.keystr(p), x, spec, rank,
                                basis_side, strict=False), tree)

  def per_subtree(spec_path, spec, subtree):
    return with_path(
        lambda p, x: _leaf_plan(jax.tree_util.keystr(tuple(spec_path) + p), x,
                                spec, rank, basis_side, strict=True), subtree)

  try:
    return with_path(per_subtree, specs, tree, is_leaf=_is_spec_leaf)
  except ValueError as e:
    if "dimension_numbers" in str(e):
      raise
    raise ValueError(
        "dimension_numbers must be None, a SubTrackDimensionNumbers, a pytree "
        "prefix of the parameters whose leaves are SubTrackDimensionNumbers or "
        f"None, or a callable returning one; its structure did not match: {e}"
    ) from e


def is_plan(x) -> bool:
  """``is_leaf`` for trees of :class:`LeafPlan`."""
  return isinstance(x, LeafPlan)


@dataclasses.dataclass(frozen=True)
class Plans:
  """A tree of :class:`LeafPlan`, hashable: static data of a state.

  Attributes:
    treedef: the parameters' tree structure.
    leaves: one :class:`LeafPlan` per parameter leaf, in flattening order.
  """

  treedef: Any
  leaves: tuple

  @classmethod
  def of(cls, plans) -> "Plans":
    leaves, treedef = jax.tree.flatten(plans, is_leaf=is_plan)
    return cls(treedef, tuple(leaves))

  def tree(self):
    """The plans as a pytree with the parameters' structure."""
    return jax.tree.unflatten(self.treedef, self.leaves)

  def geometry(self) -> tuple:
    """The leaf plans without their paths (what fixes the state's shapes)."""
    return tuple(dataclasses.replace(pl, path="") for pl in self.leaves)

  def on(self, tree):
    """The plans laid on ``tree`` (same leaves in flattening order), with
    ``tree``'s key paths; ``ValueError`` if the leaf counts differ."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if len(flat) != len(self.leaves):
      raise ValueError(f"the state was built for {len(self.leaves)} leaves, "
                       f"got a tree of {len(flat)}")
    return treedef.unflatten([
        dataclasses.replace(pl, path=jax.tree_util.keystr(path))
        for (path, _), pl in zip(flat, self.leaves)])

  def __eq__(self, other) -> bool:
    # ``None`` is the plans of a state built on a tree with no leaves, such
    # as ``optax.tree.map_params``' placeholder: its structure must match
    # any state's (``None == plans`` falls back on this method).
    if other is None:
      return True
    if not isinstance(other, Plans):
      return NotImplemented
    return (self.treedef, self.leaves) == (other.treedef, other.leaves)

  def __hash__(self) -> int:
    return hash((self.treedef, self.leaves))

  @property
  def rank(self) -> int:
    """The projection rank (0 when no leaf is projected)."""
    return max((pl.rank for pl in self.leaves), default=0)

  def __repr__(self) -> str:
    n = sum(pl.projected for pl in self.leaves)
    return f"Plans({len(self.leaves)} leaves, {n} projected)"


def dense_warning(leaves: Sequence[LeafPlan]) -> Optional[str]:
  """What to warn about when nothing is projected, or when leaves that the
  user's ``dimension_numbers`` named as matrices are dense; else ``None``."""
  if not leaves:
    return None
  if not any(pl.projected for pl in leaves):
    why = sorted({pl.why for pl in leaves})
    return (f"subtrack: none of the {len(leaves)} parameter leaves is "
            f"projected, each gets plain Adam ({'; '.join(why)[:300]}); "
            "lower rank, or check dimension_numbers")
  named = [pl for pl in leaves if pl.named and not pl.projected]
  if not named:
    return None
  listed = ", ".join(f"{pl.path} ({pl.why})" for pl in named[:8])
  more = f" and {len(named) - 8} more" if len(named) > 8 else ""
  return (f"subtrack: dimension_numbers names {len(named)} leaves as "
          f"matrices but they get plain Adam: {listed}{more}")
