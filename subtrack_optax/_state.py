"""The state of :func:`subtrack_optax.subtrack`, which knows its leaf plans."""

from typing import Any, NamedTuple, Optional

import jax
import optax

from subtrack_optax import _plans

__all__ = ["SubTrackState", "MASKED", "subtrack_states"]

# The placeholder of a state leaf that a dense parameter does not have.
MASKED = optax.MaskedNode()


class _Fields(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  basis: optax.Updates
  recovery_norm: optax.Updates


class SubTrackState(_Fields):
  """State of :func:`subtrack`.

  Every field but ``count`` has the structure of the parameters. For a
  projected matrix leaf of canonical shape ``(batch..., d, D)``:
  ``mu``/``nu`` are ``(batch..., r, D)``, ``basis`` is ``(batch..., d, r)``
  and ``recovery_norm`` is ``(batch...)`` (float32). For a dense leaf
  ``mu``/``nu`` have the leaf's shape and ``basis``/``recovery_norm`` hold
  ``optax.MaskedNode()``.

  The state also carries, as static pytree metadata (not leaves), the
  :class:`~subtrack_optax._plans.Plans` it was built with: which axes of
  each leaf form its matrix, which side the basis spans, and the rank, so
  :func:`~subtrack_optax.partition_specs` and
  :func:`~subtrack_optax.subspace_diagnostics` need nothing else. The
  leaves and their key paths are those of a plain ``NamedTuple`` with the
  five fields below: checkpoints (orbax, pickle) written before the plans
  were carried restore unchanged (a state unpickled from such a file has
  ``plans=None``).

  Attributes:
    count: int32 number of updates applied so far.
    mu: first moments (in ``mu_dtype``, else the parameter dtype).
    nu: second moments (parameter dtype).
    basis: orthonormal bases (``basis_dtype``).
    recovery_norm: norm of the last recovery term, for the growth limiter.
    plans: the leaf plans (static), or ``None``.
  """

  plans: Optional[_plans.Plans] = None

  def __new__(cls, count, mu, nu, basis, recovery_norm, plans=None):
    self = super().__new__(cls, count, mu, nu, basis, recovery_norm)
    self.plans = plans
    return self

  def __reduce__(self):
    return (SubTrackState, tuple(self) + (self.plans,))

  def _replace(self, **kwargs: Any) -> "SubTrackState":
    plans = kwargs.pop("plans", self.plans)
    return SubTrackState(*super()._replace(**kwargs), plans=plans)

  def __repr__(self) -> str:
    return super().__repr__()[:-1] + f", plans={self.plans!r})"


_KEYS = tuple(jax.tree_util.GetAttrKey(f) for f in _Fields._fields)

# Registered explicitly (this takes precedence over the generic NamedTuple
# handling): the children and key paths are the five fields, the plans are
# static auxiliary data.
jax.tree_util.register_pytree_with_keys(
    SubTrackState,
    lambda s: (tuple(zip(_KEYS, tuple(s))), s.plans),
    lambda plans, children: SubTrackState(*children, plans=plans),
    flatten_func=lambda s: (tuple(s), s.plans),
)


def subtrack_states(opt_state: Any) -> list:
  """Every :class:`SubTrackState` inside an optimizer state tree (any
  nesting of optax states: ``chain``, ``masked``, ``inject_hyperparams``
  ...), in flattening order."""
  is_st = lambda x: isinstance(x, SubTrackState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_st) if is_st(x)]
