"""Parameters boxed in Flax NNX ``Variable`` objects: unboxed for the math, the
state reboxed with its own sharding metadata.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` calls ``tx.init`` on the model's
``nnx.Param`` variables and keeps each state variable's metadata; its
``out_sharding`` (the parameter's partition spec) then shards the state
value. That is right for Adam's moments (the parameter's shape) and wrong
for SubTrack's low-rank state (a ``(d, r)`` basis, ``(r, D)`` moments, a
per-matrix scalar). So ``init`` computes on the plain arrays and gives each
state variable the metadata of its parameter with ``out_sharding`` replaced
by the spec of :func:`subtrack_optax.partition_specs`; what
``nnx.get_partition_spec`` reports, what ``nnx.Optimizer`` shards the state
with and what ``partition_specs`` returns are one layout.

Flax is not a dependency: a ``Variable`` can only exist if ``flax.nnx`` has
been imported, so it is looked up in ``sys.modules``.
"""

import sys
from typing import Optional

import jax
import optax
from jax.sharding import PartitionSpec as P

from subtrack_optax import _sharding

__all__ = ["has_variables", "unbox", "rebox"]

_SHARDING = "out_sharding"


def _variable_type() -> Optional[type]:
  nnx = sys.modules.get("flax.nnx")
  return getattr(nnx, "Variable", None)


def _is_variable(x) -> bool:
  t = _variable_type()
  return t is not None and isinstance(x, t)


def has_variables(tree) -> bool:
  """Whether any node of ``tree`` is a Flax NNX ``Variable``."""
  if _variable_type() is None:
    return False
  return any(map(_is_variable,
                 jax.tree.leaves(tree, is_leaf=_is_variable)))


def unbox(tree):
  """``tree`` with every ``Variable`` replaced by its value."""
  if _variable_type() is None:
    return tree
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x,
                      tree, is_leaf=_is_variable)


def _param_spec(var) -> Optional[P]:
  """The partition spec in ``var``'s metadata (``None`` if it has none)."""
  names = var.get_metadata().get(_SHARDING)
  if names is None:
    return None
  return names if isinstance(names, P) else P(*names)


def _boxed(var, value, spec: P):
  """``var``'s kind and metadata around ``value``, sharded as ``spec``."""
  if _param_spec(var) is None:
    return var.replace(value)
  return var.replace(value, **{_SHARDING: tuple(spec)})


def rebox(params, plans, fields, sizes=None):
  """Boxes state ``fields`` (trees shaped like the unboxed params) like
  ``params``, with the state's own partition specs.

  Args:
    params: the parameters as given to ``init`` (``Variable`` leaves).
    plans: the leaf plans of the unboxed parameters (flattened, in order).
    fields: ``(mu, nu, basis, recovery_norm)`` trees of the state.
    sizes: mesh axis sizes for the divisibility fallback of the specs.

  Returns:
    The four fields, each ``Variable`` of ``params`` replaced by a
    ``Variable`` of the same kind and metadata whose ``out_sharding`` is
    that state leaf's spec (unchanged if the parameter carries none).
  """
  boxes, treedef = jax.tree.flatten(params, is_leaf=_is_variable)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  flat = [jax.tree.leaves(f, is_leaf=is_masked) for f in fields]
  out = [[] for _ in fields]
  for i, (var, plan) in enumerate(zip(boxes, plans)):
    leaves = [f[i] for f in flat]
    if not _is_variable(var):
      specs = (None,) * len(leaves)
    elif plan.projected:
      moments, basis, recovery = _sharding.projected_specs(
          plan, _param_spec(var), sizes)
      specs = (moments, moments, basis, recovery)
    else:
      dense = _sharding.dense_spec(plan.shape, _param_spec(var), sizes)
      specs = (dense, dense, None, None)
    for o, leaf, spec in zip(out, leaves, specs):
      o.append(leaf if spec is None else _boxed(var, leaf, spec))
  return tuple(treedef.unflatten(o) for o in out)
