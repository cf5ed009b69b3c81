"""Which axes of a leaf form the projected matrix, and the canonical frame.

A matrix leaf is viewed as ``(batch..., m, n)``: ``m`` is the product of the
reduction axes, ``n`` of the output axes, every other axis is a batch axis
whose slices are independent matrices. The basis spans one side (``d``
rows); the canonical frame ``X`` is ``(batch..., d, D)``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _sharding

__all__ = [
    "SubTrackDimensionNumbers",
    "LeafPlan",
    "resolve_plans",
    "to_canonical",
    "from_canonical",
]

AxisSpec = Union[int, Sequence[int]]


class SubTrackDimensionNumbers(NamedTuple):
  """Axes of a leaf that form the matrix to project.

  Every axis that is neither a reduction nor an output axis is a batch axis:
  each batch slice is its own matrix with its own basis and moments (for
  example the layer axis ``L`` of scanned layers ``(L, m, n)``).

  Attributes:
    reduction_axis: int or tuple of ints (negative allowed): the input side
      of the matrix, ``m = prod(shape[reduction_axis])``.
    output_axis: int or tuple of ints: the output side,
      ``n = prod(shape[output_axis])``.

  Example:
    >>> import subtrack_optax as st
    >>> # a 3-D attention query kernel (embed, heads, head_dim)
    >>> spec = st.SubTrackDimensionNumbers(reduction_axis=0,
    ...                                    output_axis=(1, 2))
  """

  reduction_axis: AxisSpec = 0
  output_axis: AxisSpec = 1


_DEFAULT = SubTrackDimensionNumbers(reduction_axis=-2, output_axis=-1)


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
  axes = (spec,) if isinstance(spec, (int, np.integer)) else tuple(spec)
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
  dense = LeafPlan(path=path, shape=shape, projected=False)
  if spec is None or jnp.issubdtype(dtype, jnp.complexfloating):
    return dense
  if not strict and len(shape) < 2:
    return dense
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
    return dense
  if basis_side == "small":
    on_red = m <= n
  else:
    on_red = m >= n
  return LeafPlan(path=path, shape=shape, projected=True, batch_axes=batch,
                  reduction_axes=red, output_axes=out, m=m, n=n,
                  basis_on_reduction=on_red, rank=rank)


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


def to_canonical(g: jax.Array, plan: LeafPlan) -> jax.Array:
  """Leaf ``g`` -> ``X`` of shape ``(batch..., d, D)`` in float32."""
  perm = plan.batch_axes + plan.reduction_axes + plan.output_axes
  x = jnp.transpose(g, perm) if perm != tuple(range(len(perm))) else g
  # Explicit sharding: merged axes take their parts' mesh axes in order.
  groups = (1,) * len(plan.batch_axes) + (len(plan.reduction_axes),
                                          len(plan.output_axes))
  x = x.reshape(plan.batch_shape + (plan.m, plan.n),
                out_sharding=_sharding.merge_sharding(x, groups))
  x = x.astype(jnp.float32)
  return x if plan.basis_on_reduction else jnp.swapaxes(x, -1, -2)


def from_canonical(x: jax.Array, plan: LeafPlan, dtype) -> jax.Array:
  """Inverse of :func:`to_canonical`, cast to ``dtype``."""
  x = x if plan.basis_on_reduction else jnp.swapaxes(x, -1, -2)
  perm = plan.batch_axes + plan.reduction_axes + plan.output_axes
  shape = tuple(plan.shape[a] for a in perm)
  groups = (1,) * len(plan.batch_axes) + (len(plan.reduction_axes),
                                          len(plan.output_axes))
  x = x.reshape(shape, out_sharding=_sharding.split_sharding(x, shape, groups))
  x = x.astype(dtype)
  if perm == tuple(range(len(perm))):
    return x
  return jnp.transpose(x, np.argsort(perm))
