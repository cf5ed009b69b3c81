"""Sharding of the SubTrack++ state on device meshes.

A projected matrix leaf is viewed in its canonical frame ``X`` of shape
``(batch..., d, D)`` (see :mod:`subtrack_optax._frame`). If the
parameter shards its basis side (``d``) over mesh axes ``A`` and its other
side (``D``) over mesh axes ``B``, the state is laid out as

=================  =========================  ===============================
leaf               shape                      partition spec
=================  =========================  ===============================
basis              ``(batch..., d, r)``       ``(batch specs..., A, B)``
mu, nu             ``(batch..., r, D)``       ``(batch specs..., A, B)``
recovery_norm      ``(batch...)``             ``(batch specs...)``
dense mu, nu       the parameter's shape      the parameter's spec
count              ``()``                     ``P()``
=================  =========================  ===============================

so no state leaf is replicated along a mesh axis that shards its parameter.
A dimension keeps the longest leading run of its mesh axes whose product
divides its size; the remaining axes replicate it (for example ``r = 6``
on a 4-way axis). When several parameter axes merge into ``d`` or ``D``
(:class:`SubTrackDimensionNumbers` with tuples), their mesh axes merge in
order, exactly as :func:`jax.numpy.reshape` merges them.

This module also holds the small helpers that make the update well typed
under explicit sharding (``jax.sharding.AxisType.Explicit``): they return
``None`` (and change nothing) for arrays that are not explicitly sharded,
so the single-device and ``Auto``-mode programs are unchanged.

It is the bottom layer of the package: it imports jax only, and knows
nothing of the transform (a "plan" here is any object with the attributes
of :class:`subtrack_optax._plans.LeafPlan`).
"""

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "LeafShardings",
    "dense_spec",
    "projected_specs",
    "mesh_sizes",
    "explicit_sharding",
    "init_shardings",
    "sharded_matmul",
    "reduced_sharding",
    "merge_sharding",
    "split_sharding",
    "like",
    "to_compute_layout",
    "sharding_key",
]

Axes = tuple  # tuple[str, ...]: the mesh axes of one array dimension


# ---------------------------------------------------------------- specs --


def _axes_of(entry) -> Axes:
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _entries(spec, ndim: int) -> tuple:
  """A spec as one tuple of mesh-axis names per dimension (length ndim)."""
  if spec is None:
    spec = P()
  if not isinstance(spec, P):
    raise TypeError(f"expected a jax.sharding.PartitionSpec, got {spec!r}")
  if len(spec) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the "
                     f"array's {ndim} dimensions")
  return tuple(_axes_of(e) for e in spec) + ((),) * (ndim - len(spec))


def _entry(axes: Axes):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


def _spec(*dims: Axes) -> P:
  return P(*(_entry(a) for a in dims))


def _fit(axes: Axes, size: int, sizes: Optional[Mapping[str, int]]) -> Axes:
  """Longest leading run of ``axes`` whose mesh size divides ``size``."""
  if sizes is None:
    return tuple(axes)
  out, prod = [], 1
  for a in axes:
    n = sizes.get(a)
    if n is None:  # axis unknown to the mesh: cannot check, keep it
      out.append(a)
      continue
    if size % (prod * n):
      break
    prod *= n
    out.append(a)
  return tuple(out)


def dense_spec(shape, param_spec, sizes=None) -> P:
  """Spec of a state leaf shaped like its parameter (Adam moments)."""
  e = _entries(param_spec, len(shape))
  return _spec(*(_fit(a, s, sizes) for a, s in zip(e, shape)))


def projected_specs(plan, param_spec,
                    sizes=None) -> tuple[P, P, P]:
  """``(moments, basis, recovery_norm)`` specs of a projected leaf.

  Args:
    plan: the leaf's ``LeafPlan`` (``plan.projected`` is True).
    param_spec: the parameter's ``PartitionSpec`` (``None`` = replicated).
    sizes: mesh axis sizes (name -> int) for the divisibility fallback, or
      ``None`` to skip it.

  Returns:
    specs for ``mu``/``nu`` ``(batch..., r, D)``, ``basis``
    ``(batch..., d, r)`` and ``recovery_norm`` ``(batch...)``.
  """
  e = _entries(param_spec, len(plan.shape))
  batch = [_fit(e[a], plan.shape[a], sizes) for a in plan.batch_axes]
  red = sum((e[a] for a in plan.reduction_axes), ())
  out = sum((e[a] for a in plan.output_axes), ())
  side, other = (red, out) if plan.basis_on_reduction else (out, red)
  r = plan.rank
  moments = _spec(*batch, _fit(side, r, sizes), _fit(other, plan.big_d, sizes))
  basis = _spec(*batch, _fit(side, plan.d, sizes), _fit(other, r, sizes))
  return moments, basis, _spec(*batch)


def mesh_sizes(mesh=None, params=None) -> Optional[dict]:
  """Mesh axis sizes: ``mesh``'s, the current mesh's, or the params' mesh."""
  if mesh is not None:
    return dict(mesh.shape)
  current = jax.sharding.get_abstract_mesh()
  if not current.empty:
    return dict(current.shape)
  for leaf in jax.tree.leaves(params):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding):
      return dict(s.mesh.shape)
  return None


# ------------------------------------------------ explicit-mode helpers --


def explicit_sharding(x) -> Optional[NamedSharding]:
  """``x``'s sharding if it is typed on a mesh with Explicit axes, else None."""
  try:
    s = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  if not isinstance(s, NamedSharding):
    return None
  if not any(t == AxisType.Explicit for t in getattr(s.mesh, "axis_types", ())):
    return None
  return s


class LeafShardings(NamedTuple):
  """Shardings of one leaf's state under explicit sharding (or ``None``s)."""

  moments: Optional[NamedSharding]
  basis: Optional[NamedSharding] = None
  recovery_norm: Optional[NamedSharding] = None


def init_shardings(plan, param) -> LeafShardings:
  """Shardings of ``param``'s state leaves under explicit sharding.

  All ``None`` when ``param`` is not explicitly sharded; for a dense leaf
  only ``moments`` is set.
  """
  s = explicit_sharding(param)
  if s is None:
    return LeafShardings(None)
  sizes = dict(s.mesh.shape)
  if not plan.projected:
    return LeafShardings(s.update(spec=dense_spec(plan.shape, s.spec, sizes)))
  return LeafShardings(*(s.update(spec=sp)
                         for sp in projected_specs(plan, s.spec, sizes)))


def matmul_out_sharding(a, b) -> Optional[NamedSharding]:
  """Output sharding for ``a @ b`` when its contracted axis is sharded.

  Under explicit sharding a contraction over an axis sharded in both
  operands is ambiguous; the output keeps the batch and free axes' specs
  (the contraction becomes a reduction across devices of an output-sized
  piece). ``None`` when no annotation is needed.
  """
  sa, sb = explicit_sharding(a), explicit_sharding(b)
  if sa is None or sb is None or a.ndim < 2 or b.ndim < 2:
    return None
  ea, eb = _entries(sa.spec, a.ndim), _entries(sb.spec, b.ndim)
  if not (ea[-1] and eb[-2]):
    return None
  nb = max(a.ndim, b.ndim) - 2
  batch = []
  for i in range(nb):
    ia, ib = a.ndim - 2 - nb + i, b.ndim - 2 - nb + i
    batch.append((ea[ia] if ia >= 0 else ()) or (eb[ib] if ib >= 0 else ()))
  used = set(sum(batch, ()))
  row = tuple(x for x in ea[-2] if x not in used)
  used |= set(row)
  col = tuple(x for x in eb[-1] if x not in used)
  return sa.update(spec=_spec(*batch, row, col))


def sharded_matmul(a, b, precision=None):
  """``jnp.matmul(a, b)``, with :func:`matmul_out_sharding` when needed.

  Default precision unless given (``_linalg.matmul`` is the full-float32
  product built on this one).

  The annotated product is written as an ``einsum`` (the same dot_general):
  in jax 0.10.2 ``jnp.matmul`` applies ``out_sharding`` to the wrong axes
  when both operands have a batch axis of size 1.
  """
  out = matmul_out_sharding(a, b)
  if out is None:
    return jnp.matmul(a, b, precision=precision)
  return jnp.einsum("...ij,...jk->...ik", a, b, precision=precision,
                    out_sharding=out)


def reduced_sharding(x, axis: int) -> Optional[NamedSharding]:
  """Sharding of a contraction of ``x`` over ``axis`` (None if not needed)."""
  s = explicit_sharding(x)
  if s is None:
    return None
  e = list(_entries(s.spec, x.ndim))
  if not e[axis]:
    return None
  del e[axis]
  return s.update(spec=_spec(*e))


def merge_sharding(x, groups) -> Optional[NamedSharding]:
  """Sharding of ``x`` reshaped by merging each group of consecutive axes.

  ``groups`` lists, in order, the number of axes merged into each output
  axis. The merged axis takes the mesh axes of its parts in order, as
  :func:`jax.numpy.reshape` does where it can infer it (where the parts'
  shards are not one contiguous block this is a re-layout, an all-to-all).
  """
  s = explicit_sharding(x)
  if s is None:
    return None
  e = _entries(s.spec, x.ndim)
  out, i = [], 0
  for n in groups:
    out.append(sum(e[i:i + n], ()))
    i += n
  return s.update(spec=_spec(*out))


def split_sharding(x, shape, groups) -> Optional[NamedSharding]:
  """Sharding of ``x`` reshaped to ``shape`` by splitting axes.

  Axis ``i`` of ``x`` splits into the next ``groups[i]`` entries of
  ``shape`` and hands its mesh axes to them front to back: a part takes axes
  while they divide it, and the next part gets the rest only once this one
  is fully split (the inverse of :func:`merge_sharding` on a contiguous
  merge; other axes are dropped, i.e. gathered).
  """
  s = explicit_sharding(x)
  if s is None:
    return None
  sizes = dict(s.mesh.shape)
  e = _entries(s.spec, x.ndim)
  out, j = [], 0
  for axes, n_parts in zip(e, groups):
    parts = shape[j:j + n_parts]
    j += n_parts
    queue = list(axes)
    for n in parts:
      took, local = [], n
      while queue and local % sizes[queue[0]] == 0:
        local //= sizes[queue[0]]
        took.append(queue.pop(0))
      out.append(tuple(took))
      if local != 1:
        queue = []  # later parts cannot take axes: layout not a block
  return s.update(spec=_spec(*out))


def like(x, ref):
  """``x`` resharded to ``ref``'s explicit sharding (else ``x`` as is; a
  constant or iota-made array with no sharding of its own,
  is placed with ``ref``'s)."""
  s = explicit_sharding(ref)
  if s is None:
    return x
  return jax.sharding.reshard(x, s)


def like_slice(x, a, n: int):
  """``x`` resharded to the sharding of ``a[i_1, ..., i_n]`` (``a``'s
  sharding without its first ``n`` axes; ``x`` as is without explicit
  sharding)."""
  s = explicit_sharding(a)
  if s is None or explicit_sharding(x) is None:
    return x
  target = s.update(spec=_spec(*_entries(s.spec, a.ndim)[n:]))
  return jax.sharding.reshard(x, target)


def to_compute_layout(x, s, mu, nu):
  """Gathers the stored ``r``-axis shards for the update of one leaf.

  With ``X`` sharded ``(batch..., A, B)`` the update works on the basis as
  ``(batch..., A, None)`` and on the moments as ``(batch..., None, B)``:
  this all-gathers ``d x r`` and ``r x D`` pieces only, and every ``r x r``
  matrix is then replicated.
  """
  sx = explicit_sharding(x)
  if sx is None:
    return s, mu, nu
  e = _entries(sx.spec, x.ndim)
  re = jax.sharding.reshard
  return (re(s, sx.update(spec=_spec(*e[:-1], ()))),
          re(mu, sx.update(spec=_spec(*e[:-2], (), e[-1]))),
          re(nu, sx.update(spec=_spec(*e[:-2], (), e[-1]))))


def sharding_key(x) -> Optional[str]:
  """The explicit sharding spec of ``x`` as a string (``None`` if none)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  return None if sharding is None else str(getattr(sharding, "spec", None))
