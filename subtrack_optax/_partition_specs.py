"""``partition_specs``: the sharding of a whole optimizer state on a mesh."""

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from subtrack_optax import _plans
from subtrack_optax import _sharding
from subtrack_optax._state import SubTrackState

__all__ = ["partition_specs"]


def _is_spec(x) -> bool:
  return x is None or isinstance(x, P)


def _is_state(x) -> bool:
  return isinstance(x, SubTrackState)


def _is_plan_or_masked(x) -> bool:
  return isinstance(x, (_plans.LeafPlan, optax.MaskedNode))


def _subtrack_specs(node: SubTrackState, specs, sizes) -> SubTrackState:
  """Specs of one :class:`SubTrackState` from the plans it carries."""
  if node.plans is None:
    raise ValueError("partition_specs: a SubTrackState carries no leaf plans")

  def per_leaf(plan, spec):
    if isinstance(plan, optax.MaskedNode):
      return (plan,) * 3
    if not plan.projected:
      return (_sharding.dense_spec(plan.shape, spec, sizes),
              optax.MaskedNode(), optax.MaskedNode())
    return _sharding.projected_specs(plan, spec, sizes)

  plans = node.plans.tree()
  try:
    out = jax.tree.map(per_leaf, plans, specs, is_leaf=_is_plan_or_masked)
  except ValueError as e:
    raise ValueError(
        "partition_specs: a subtrack state does not have the structure of "
        f"param_specs: {e}") from e
  pick = lambda i: jax.tree.map(lambda pl, o: o[i], plans, out,
                                is_leaf=_is_plan_or_masked)
  return SubTrackState(P(), pick(0), pick(0), pick(1), pick(2),
                       plans=node.plans)


def _params_like_specs(node, params, specs, sizes):
  """The params' specs if ``node`` is a params-shaped subtree, else None."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  flat = jax.tree.leaves(node, is_leaf=is_masked)
  if len(flat) != jax.tree.structure(params).num_leaves or not flat:
    return None

  def checked(n, p, sp):
    if is_masked(n):
      return n
    if not hasattr(p, "shape") or tuple(n.shape) != tuple(p.shape):
      raise ValueError("not params-shaped")
    return _sharding.dense_spec(n.shape, sp, sizes)

  try:
    return jax.tree.map(checked, node, params, specs, is_leaf=is_masked)
  except (ValueError, TypeError):
    return None


def _state_specs(node, params, specs, sizes):
  """Walks a state tree: subtrack states, params-shaped subtrees, scalars."""
  if _is_state(node):
    return _subtrack_specs(node, specs, sizes)
  if not any(map(_is_state, jax.tree.leaves(node, is_leaf=_is_state))):
    matched = _params_like_specs(node, params, specs, sizes)
    if matched is not None:
      return matched
  if not jax.tree.leaves(node):  # None, EmptyState, (), MaskedNode ...
    return node
  if jax.tree_util.all_leaves([node]):
    return P()
  kids, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
  return jax.tree.unflatten(
      treedef, [_state_specs(k, params, specs, sizes) for k in kids])


def partition_specs(tx: Any, params: Any, param_specs: Any, *,
                    mesh: Any = None) -> Any:
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

  ``tx.init`` is traced abstractly (:func:`jax.eval_shape`; nothing is
  computed or allocated); each :class:`SubTrackState` it returns carries its
  leaf plans (dimension numbers, rank and basis side of its ``subtrack``).

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
  init = tx.init if hasattr(tx, "init") else tx
  sizes = _sharding.mesh_sizes(mesh, params)
  try:
    specs = jax.tree.broadcast(param_specs, params, is_leaf=_is_spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError("partition_specs: param_specs must be a pytree of "
                     "PartitionSpec (or None) with the structure of params "
                     f"(or a prefix of it): {e}") from e
  specs = jax.tree.map(lambda s: P() if s is None else s, specs,
                       is_leaf=_is_spec)
  return _state_specs(jax.eval_shape(init, params), params, specs, sizes)
