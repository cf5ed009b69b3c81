"""Sharding of the SubTrack++ state on device meshes.

A projected matrix leaf is viewed in its canonical frame ``X`` of shape
``(batch..., d, D)`` (see :mod:`subtrack_optax._dimension_numbers`). If the
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
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["partition_specs"]

Axes = tuple  # tuple[str, ...]: the mesh axes of one array dimension
_MASKED = optax.MaskedNode


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


def init_shardings(plan, param):
  """Shardings of ``param``'s state leaves under explicit sharding.

  Returns ``None`` when ``param`` is not explicitly sharded, else
  ``(moments, basis, recovery_norm)`` shardings for a projected leaf and
  ``(moments, None, None)`` for a dense one.
  """
  s = explicit_sharding(param)
  if s is None:
    return None
  sizes = dict(s.mesh.shape)
  if not plan.projected:
    return s.update(spec=dense_spec(plan.shape, s.spec, sizes)), None, None
  return tuple(s.update(spec=sp)
               for sp in projected_specs(plan, s.spec, sizes))


def init_sharding(plan, param, which: int):
  """Entry ``which`` of :func:`init_shardings` (``None`` if not explicit)."""
  out = init_shardings(plan, param)
  return None if out is None else out[which]


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


def matmul(a, b, precision=None):
  """``jnp.matmul(a, b)``, with :func:`matmul_out_sharding` when needed.

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
  """``x`` resharded to ``ref``'s explicit sharding (else ``x`` as is)."""
  s = explicit_sharding(ref)
  if s is None or explicit_sharding(x) is None:
    return x
  return jax.sharding.reshard(x, s)


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


# ------------------------------------------------------ partition_specs --

_local = threading.local()


def record_init(state, plans) -> None:
  """Called by ``subtrack``'s init: lets :func:`partition_specs` recover the
  leaf plans (dimension numbers, rank, basis side) of each SubTrackState."""
  records = getattr(_local, "records", None)
  if records is not None:
    records.append((state, plans))


def _mesh_sizes(mesh, params) -> Optional[dict]:
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


def _is_spec(x) -> bool:
  return x is None or isinstance(x, P)


def partition_specs(tx, params, param_specs, *, mesh=None):
  r"""Partition specs of ``tx.init(params)`` for parameters sharded as given.

  Works for any optax transformation or chain containing
  :func:`subtrack` (also inside ``optax.masked``, ``optax.partition``,
  ``optax.inject_hyperparams`` ...). SubTrack's low-rank leaves get specs
  that follow their parameter (see the table below); state subtrees shaped
  like the parameters (e.g. another transform's moments) get the
  parameters' specs; every other leaf (step counts, scalars) gets ``P()``.

  For a projected leaf whose parameter shards the basis side ``d`` over
  mesh axes ``A`` and the other side ``D`` over ``B`` (batch axes keep
  their own specs):

  .. math::

     \text{basis } (\ldots, d, r): (\ldots, A, B), \qquad
     \mu, \nu\ (\ldots, r, D): (\ldots, A, B), \qquad
     \text{recovery\_norm } (\ldots): (\ldots)

  A dimension that a mesh axis does not divide is replicated along that
  axis (and the axes after it), e.g. the ``r`` axis when ``rank`` is not a
  multiple of the mesh size.

  The dimension numbers, rank and basis side of each ``subtrack`` are
  recovered by tracing ``tx.init`` abstractly (:func:`jax.eval_shape`;
  nothing is computed or allocated): ``subtrack``'s init reports its leaf
  plans for the state it returns.

  Args:
    tx: an optax ``GradientTransformation`` (or an init function).
    params: the parameters (arrays or :class:`jax.ShapeDtypeStruct`).
    param_specs: a pytree of ``PartitionSpec`` (``None`` = replicated) with
      the structure of ``params``, or a prefix of it.
    mesh: optional ``Mesh``/``AbstractMesh`` whose axis sizes are used for
      the divisibility fallback; by default the current mesh
      (``jax.set_mesh``), else the mesh of ``params``' shardings, else no
      divisibility check.

  Returns:
    A pytree of ``PartitionSpec`` with exactly the structure of
    ``tx.init(params)`` (``optax.MaskedNode`` entries kept).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import PartitionSpec as P
    >>> import subtrack_optax as st
    >>> params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((128,))}
    >>> specs = {"w": P("data", "model"), "b": P("model")}
    >>> tx = optax.chain(st.subtrack(rank=4), optax.scale(-1e-3))
    >>> state_specs = st.partition_specs(tx, params, specs)
    >>> state_specs[0].basis["w"], state_specs[0].mu["w"]
    (P('data', 'model'), P('data', 'model'))
  """
  # Imported here: those modules import this one.
  from subtrack_optax import _dimension_numbers as dn  # pylint: disable=g-import-not-at-top
  from subtrack_optax._transform import SubTrackState  # pylint: disable=g-import-not-at-top

  init = tx.init if hasattr(tx, "init") else tx
  sizes = _mesh_sizes(mesh, params)
  try:
    specs = jax.tree.broadcast(param_specs, params, is_leaf=_is_spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError("partition_specs: param_specs must be a pytree of "
                     "PartitionSpec (or None) with the structure of params "
                     f"(or a prefix of it): {e}") from e
  specs = jax.tree.map(lambda s: P() if s is None else s, specs,
                       is_leaf=_is_spec)
  is_node = lambda x: isinstance(x, SubTrackState)
  plans_at = {}

  def traced(params):
    records = []
    previous = getattr(_local, "records", None)
    _local.records = records
    try:
      state = init(params)
    finally:
      _local.records = previous
    nodes = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_node)[0]
    for path, node in nodes:
      if not is_node(node):
        continue
      match = [pl for st, pl in records if st.count is node.count]
      if not match and len(records) == 1:
        match = [records[0][1]]
      if not match:
        raise ValueError(
            "partition_specs: could not tell which subtrack made the state "
            f"at {jax.tree_util.keystr(path)}")
      plans_at[path] = match[0]
    return state

  shapes = jax.eval_shape(traced, params)

  def subtrack_specs(plans):
    def per_leaf(plan, spec):
      if isinstance(plan, _MASKED):
        return (plan,) * 3
      if not plan.projected:
        return dense_spec(plan.shape, spec, sizes), _MASKED(), _MASKED()
      return projected_specs(plan, spec, sizes)

    try:
      out = jax.tree.map(per_leaf, plans, specs,
                         is_leaf=lambda x: isinstance(x, (dn.LeafPlan, _MASKED)))
    except ValueError as e:
      raise ValueError(
          "partition_specs: a subtrack state does not have the structure of "
          f"param_specs: {e}") from e
    pick = lambda i: jax.tree.map(
        lambda pl, o: o[i], plans, out,
        is_leaf=lambda x: isinstance(x, (dn.LeafPlan, _MASKED)))
    return SubTrackState(count=P(), mu=pick(0), nu=pick(0), basis=pick(1),
                         recovery_norm=pick(2))

  param_leaves = jax.tree.structure(params)

  def match_params(node):
    """The params' specs if ``node`` is a params-shaped subtree, else None."""
    is_masked = lambda x: isinstance(x, _MASKED)
    flat, treedef = jax.tree.flatten(node, is_leaf=is_masked)
    if len(flat) != param_leaves.num_leaves or not flat:
      return None
    try:
      return jax.tree.map(
          lambda n, p, sp: n if is_masked(n) else _checked(n, p, sp),
          node, params, specs, is_leaf=is_masked)
    except (ValueError, TypeError):
      return None

  def _checked(n, p, sp):
    if not hasattr(p, "shape") or tuple(n.shape) != tuple(p.shape):
      raise ValueError("not params-shaped")
    return dense_spec(n.shape, sp, sizes)

  def walk(path, node):
    if is_node(node):
      return subtrack_specs(plans_at[path])
    if not any(map(is_node, jax.tree.leaves(node, is_leaf=is_node))):
      matched = match_params(node)
      if matched is not None:
        return matched
    if not jax.tree.leaves(node):  # None, EmptyState, (), MaskedNode ...
      return node
    if jax.tree_util.all_leaves([node]):
      return P()
    kids, treedef = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node)
    return jax.tree.unflatten(
        treedef, [walk(path + k, child) for k, child in kids])

  return walk((), shapes)
