"""Diagnostics of the tracked subspaces: captured energy and rotation angle."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subtrack_optax import _dimension_numbers as dn
from subtrack_optax import _linalg
from subtrack_optax._transform import SubTrackState

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
  is_st = lambda x: isinstance(x, SubTrackState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_st) if is_st(x)]
  if len(found) != 1:
    raise ValueError(
        f"subspace_diagnostics: expected exactly one SubTrackState in the "
        f"optimizer state, found {len(found)}; pass the state of the chain "
        "that contains one subtrack transform (or that SubTrackState itself)")
  return found[0]


def _is_plan(x) -> bool:
  return isinstance(x, dn.LeafPlan)


def _unwrap_variables(tree):
  """Replaces Flax NNX variables (``nnx.Optimizer`` state, ``nnx.grad``
  output) by their values; other trees are returned unchanged."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return tree
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda v: v.get_value() if is_var(v) else v, tree,
                      is_leaf=is_var)


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
  return jnp.where(den > 0, frac, 0.0)


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


def subspace_diagnostics(
    grads: optax.Updates,
    state: Any,
    prev_state: Optional[Any] = None,
    *,
    dimension_numbers: Any = None,
    basis_side: str = "small",
    rank: Optional[int] = None,
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
  NNX variables (they are unwrapped; so are ``nnx.grad``'s). The leaf plans are rebuilt from ``grads`` with the transform's
  ``dimension_numbers`` and ``basis_side``, which are not stored in the state:
  pass the same values you gave ``subtrack`` (defaults: the transform's
  defaults). ``rank`` is read from the stored bases when omitted. A mismatch
  between the plans and the stored bases raises ``ValueError``.

  Args:
    grads: the gradients (same structure and shapes as the parameters; any
      scaling before ``subtrack`` in the chain, such as clipping, does not
      change the energy fraction).
    state: the optimizer state after the update.
    prev_state: the optimizer state before the update, or ``None``.
    dimension_numbers: the ``dimension_numbers`` given to ``subtrack``.
    basis_side: the ``basis_side`` given to ``subtrack``.
    rank: the ``rank`` given to ``subtrack`` (inferred when ``None``).

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
  grads = _unwrap_variables(grads)
  st_state = _unwrap_variables(find_subtrack_state(state))
  prev = (None if prev_state is None
          else _unwrap_variables(find_subtrack_state(prev_state)))
  if rank is None:
    rank = _infer_rank(st_state.basis)
  plans = dn.resolve_plans(grads, dimension_numbers, rank, basis_side)
  prev_basis = prev.basis if prev is not None else plans

  def per_leaf(plan, g, s, s_prev):
    masked = isinstance(s, optax.MaskedNode)
    if not plan.projected:
      if not masked:
        raise ValueError(_mismatch(plan, "dense", jnp.shape(s)))
      return None
    want = plan.batch_shape + (plan.d, rank)
    if masked or tuple(jnp.shape(s)) != want:
      raise ValueError(_mismatch(plan, want, "masked" if masked
                                 else jnp.shape(s)))
    s = s.astype(jnp.float32)
    energy = _energy(dn.to_canonical(g, plan), s)
    angle = None
    if prev is not None:
      angle = _largest_principal_angle(s_prev.astype(jnp.float32), s)
      angle = jnp.where(prev.count == 0, jnp.nan, angle)
    return plan.path, SubspaceDiagnostics(energy, angle)

  out = jax.tree.map(per_leaf, plans, grads, st_state.basis, prev_basis,
                     is_leaf=_is_plan)
  leaves = jax.tree.leaves(
      out, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
      and isinstance(x[1], SubspaceDiagnostics))
  return {path: diag for path, diag in leaves}


def _mismatch(plan, want, got) -> str:
  return (f"subspace_diagnostics: leaf {plan.path} resolves to {want} but the "
          f"state holds a basis of {got}; pass the dimension_numbers, "
          "basis_side and rank that the subtrack transform was built with")
