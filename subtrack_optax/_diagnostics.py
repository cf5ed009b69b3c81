"""Diagnostics of the tracked subspaces: captured energy and rotation angle."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subtrack_optax import _frame
from subtrack_optax import _linalg
from subtrack_optax import _plans
from subtrack_optax import _state
from subtrack_optax import _variables
from subtrack_optax._state import SubTrackState

__all__ = ["SubspaceDiagnostics", "subspace_diagnostics", "find_subtrack_state"]


class SubspaceDiagnostics(NamedTuple):
  """Diagnostics of one projected leaf (arrays of the leaf's batch shape).

  Attributes:
    captured_energy: ``||S^T X||_F^2 / ||X||_F^2`` in ``[0, 1]``: the fraction
      of the gradient's energy inside the subspace (0 for a zero gradient).
    rotation_angle: the largest principal angle (radians, ``[0, pi/2]``)
      between the basis of ``prev_state`` and that of ``state``; exactly 0
      when the basis did not change, NaN when ``prev_state`` had no basis yet
      (count 0); ``None`` when no ``prev_state`` was given.
  """

  captured_energy: jax.Array
  rotation_angle: Optional[jax.Array]


def find_subtrack_state(opt_state: Any) -> SubTrackState:
  """The unique :class:`SubTrackState` inside an optimizer state tree.

  Searches any nesting of optax states (``chain``, ``inject_hyperparams``,
  ``masked``, ``MultiSteps`` ...).

  Args:
    opt_state: a state returned by ``tx.init`` or ``tx.update``.

  Returns:
    The :class:`SubTrackState`.

  Raises:
    ValueError: if there is none or more than one.
  """
  found = _state.subtrack_states(opt_state)
  if len(found) != 1:
    raise ValueError(
        f"subspace_diagnostics: expected exactly one SubTrackState in the "
        f"optimizer state, found {len(found)}; pass the state of the chain "
        "that contains one subtrack transform (or that SubTrackState itself)")
  return found[0]


def _infer_rank(basis_tree) -> int:
  for leaf in jax.tree.leaves(basis_tree):
    if jnp.ndim(leaf) >= 2:
      return int(jnp.shape(leaf)[-1])
  raise ValueError("subspace_diagnostics: the SubTrackState has no projected "
                   "leaf (every basis is masked)")


def _energy(x, s):
  p = _linalg.matmul(jnp.swapaxes(s, -1, -2), x)
  num = jnp.sum(p * p, axis=(-2, -1))
  den = jnp.sum(x * x, axis=(-2, -1))
  frac = jnp.minimum(num / jnp.where(den > 0, den, 1.0), 1.0)  # rounding
  # 0 for a zero gradient; NaN (not 0) for a non-finite one, so that
  # monitoring sees it.
  return jnp.where(den == 0, 0.0, jnp.where(jnp.isfinite(den), frac, jnp.nan))


def _largest_principal_angle(s0, s1):
  """Largest principal angle between ``span(s0)`` and ``span(s1)`` (d x r).

  ``sin^2`` of the principal angles are the eigenvalues of ``R^T R`` with
  ``R = S1 - S0 (S0^T S1)``; the largest is found by repeated squaring of
  that ``r x r`` Gram (matmul only) and a Rayleigh quotient.
  """
  mm = _linalg.matmul
  mt = lambda a: jnp.swapaxes(a, -1, -2)
  resid = s1 - mm(s0, mm(mt(s0), s1))
  gram = mm(mt(resid), resid)
  v = _linalg.top_eigvec_psd(gram)
  sin_sq = jnp.einsum("...i,...ij,...j->...", v, gram, v,
                      precision=_linalg.HIGHEST)
  angle = jnp.arcsin(jnp.sqrt(jnp.clip(sin_sq, 0.0, 1.0)))
  same = jnp.all(s0 == s1, axis=(-2, -1))
  return jnp.where(same, 0.0, angle)


class _Unset:
  def __repr__(self):
    return "<from the state>"


_UNSET = _Unset()


def _resolve(grads, st_state, dimension_numbers, basis_side, rank):
  """The leaf plans: carried by the state, or from the given options."""
  given = not (dimension_numbers is _UNSET and basis_side is _UNSET
               and rank is _UNSET)
  stored = st_state.plans
  if stored is not None and not given:
    try:
      return stored.on(grads)
    except ValueError as e:
      raise ValueError(f"subspace_diagnostics: {e}") from e
  dimension_numbers = None if dimension_numbers is _UNSET else dimension_numbers
  basis_side = "small" if basis_side is _UNSET else basis_side
  if rank is _UNSET or rank is None:
    rank = stored.rank if stored is not None else _infer_rank(st_state.basis)
  return _plans.resolve_plans(grads, dimension_numbers, rank, basis_side)


def _check_against_stored(plans, st_state):
  """Options given for a state with plans must agree with its plans."""
  stored = st_state.plans
  if (stored is not None
      and _plans.Plans.of(plans).geometry() != stored.geometry()):
    raise ValueError(
        "subspace_diagnostics: the dimension_numbers, basis_side and rank "
        "given do not match those the state was built with; omit them (the "
        "state carries its leaf plans)")


def subspace_diagnostics(
    grads: optax.Updates,
    state: Any,
    prev_state: Optional[Any] = None,
    *,
    dimension_numbers: Any = _UNSET,
    basis_side: Any = _UNSET,
    rank: Any = _UNSET,
) -> dict[str, SubspaceDiagnostics]:
  r"""Per projected leaf: captured gradient energy and last rotation angle.

  For each projected leaf with gradient ``X`` in the canonical frame (the
  same ``d x D`` frame the transform uses) and basis ``S`` of ``state``:

  .. math::

     \text{captured\_energy} = \|S^T X\|_F^2 / \|X\|_F^2, \qquad
     \text{rotation\_angle} = \max_i \theta_i(S_{prev}, S)
       = \arcsin \sqrt{\lambda_{max}(R^T R)},\ R = S - S_{prev} S_{prev}^T S

  (principal angles ``theta_i``; only ``r x r`` Grams and matmuls are used,
  no LAPACK, so it runs inside ``jit`` on any device or mesh).

  ``state`` is the optimizer state returned by the update that consumed
  ``grads`` (its basis is the one ``grads`` was projected on); ``prev_state``
  the state that update received. Either may be any optax state tree that
  contains exactly one :class:`SubTrackState` (it is found by searching the
  tree), including ``nnx.Optimizer(...).opt_state``, whose leaves are Flax
  NNX variables (they are unwrapped; so are ``nnx.grad``'s). The state
  carries its leaf plans (which axes form each matrix, the basis side, the
  rank), so no option of the transform needs repeating.
  ``dimension_numbers``, ``basis_side`` and ``rank`` are only needed for a
  state that carries no plans (unpickled from a checkpoint written by
  subtrack-optax 0.1.0 before the state carried them); given for a state
  that has plans, they must agree with them. A mismatch between the plans
  and the stored bases raises ``ValueError``.

  Args:
    grads: the gradients (same structure and shapes as the parameters; any
      scaling before ``subtrack`` in the chain, such as clipping, does not
      change the energy fraction).
    state: the optimizer state after the update.
    prev_state: the optimizer state before the update, or ``None``.
    dimension_numbers: only for a state without plans: the
      ``dimension_numbers`` given to ``subtrack`` (default ``None``).
    basis_side: only for a state without plans (default ``"small"``).
    rank: only for a state without plans (read from the stored bases when
      omitted).

  Returns:
    A dict from each projected leaf's path (``jax.tree_util.keystr``) to a
    :class:`SubspaceDiagnostics` whose arrays have the leaf's batch shape
    (scalars for plain matrices).

  Example:
    >>> import jax, jax.numpy as jnp, optax, subtrack_optax as st
    >>> params = {"w": jnp.ones((16, 32)), "b": jnp.zeros((32,))}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), st.subtrack(rank=4))
    >>> s0 = tx.init(params)
    >>> g = {"w": jax.random.normal(jax.random.key(0), (16, 32)),
    ...      "b": jnp.ones((32,))}
    >>> _, s1 = tx.update(g, s0, params)
    >>> d = st.subspace_diagnostics(g, s1, s0)
    >>> sorted(d), d["['w']"].captured_energy.shape
    (["['w']"], ())
  """
  grads = _variables.unbox(grads)
  st_state = _variables.unbox(find_subtrack_state(state))
  prev = (None if prev_state is None
          else _variables.unbox(find_subtrack_state(prev_state)))
  plans = _resolve(grads, st_state, dimension_numbers, basis_side, rank)
  prev_basis = prev.basis if prev is not None else plans

  def per_leaf(plan, g, s, s_prev):
    masked = isinstance(s, optax.MaskedNode)
    if not plan.projected:
      if not masked:
        raise ValueError(_mismatch(plan, "dense", jnp.shape(s)))
      return None
    want = plan.batch_shape + (plan.d, plan.rank)
    if masked or tuple(jnp.shape(s)) != want:
      raise ValueError(_mismatch(plan, want, "masked" if masked
                                 else jnp.shape(s)))
    s = s.astype(jnp.float32)
    energy = _energy(_frame.Frame(plan).canonical(g), s)
    angle = None
    if prev is not None:
      angle = _largest_principal_angle(s_prev.astype(jnp.float32), s)
      angle = jnp.where(prev.count == 0, jnp.nan, angle)
    return plan.path, SubspaceDiagnostics(energy, angle)

  out = jax.tree.map(per_leaf, plans, grads, st_state.basis, prev_basis,
                     is_leaf=_plans.is_plan)
  _check_against_stored(plans, st_state)
  leaves = jax.tree.leaves(
      out, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
      and isinstance(x[1], SubspaceDiagnostics))
  return {path: diag for path, diag in leaves}


def _mismatch(plan, want, got) -> str:
  return (f"subspace_diagnostics: leaf {plan.path} resolves to {want} but the "
          f"state holds a basis of {got}; pass the dimension_numbers, "
          "basis_side and rank that the subtrack transform was built with "
          "(or none, for a state that carries its plans)")
