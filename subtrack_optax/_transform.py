"""The SubTrack++ gradient transformation: ``subtrack`` and ``subtrack_adamw``.

``update`` sends the projected leaves through the sweep of
:mod:`subtrack_optax._engine` (each matrix's update is
:func:`subtrack_optax._step.subspace_step` then
:func:`subtrack_optax._step.regular_step`); dense leaves go through
:func:`optax.scale_by_adam` itself.
"""

import os
import sys
import warnings
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from subtrack_optax import _config
from subtrack_optax import _engine
from subtrack_optax import _frame
from subtrack_optax import _plans
from subtrack_optax import _sharding
from subtrack_optax import _variables
from subtrack_optax._config import STATIC_ARGS
from subtrack_optax._config import SUBSPACE_UPDATES
from subtrack_optax._state import MASKED
from subtrack_optax._state import SubTrackState

__all__ = [
    "SubTrackState",
    "subtrack",
    "subtrack_adamw",
    "SUBSPACE_UPDATES",
    "STATIC_ARGS",
]


def subtrack(
    rank: int,
    update_interval: int = 200,
    *,
    subspace_update: str = "grassmann",
    step_size: float = 0.25,
    normalize_tracking: bool = True,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    transport_moments: Union[bool, str] = True,
    recovery_scaling: Union[bool, str] = True,
    norm_growth_limit: float = 1.01,
    basis_side: str = "small",
    dimension_numbers: Any = None,
    basis_dtype: Any = jnp.float32,
    mu_dtype: Optional[Any] = None,
    seed: int = 0,
    stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""SubTrack++: Adam in a tracked low-rank gradient subspace.

  For each matrix leaf, in its canonical frame ``X`` (``d x D``, see
  :class:`SubTrackDimensionNumbers` and ``basis_side``) with orthonormal basis
  ``S`` (``d x r``) and step count ``t``:

  .. math::

     S &\leftarrow \begin{cases}
        \mathrm{top}_r\,\mathrm{SVD}(X) & t = 0\\
        \mathrm{track}(S, X) \text{ (or svd / random / frozen)} & t>0,\ t \bmod k = 0
        \end{cases}\\
     M &\leftarrow C M,\quad V \leftarrow \max(C^{\circ 2}(V - M^{\circ 2})
        + (CM)^{\circ 2}, 0),\quad C = S_{new}^T S_{old}
        \quad\text{(when S changed)}\\
     P &= S^T X,\quad M \leftarrow \beta_1 M + (1-\beta_1) P,\quad
     V \leftarrow \beta_2 V + (1-\beta_2) P^{\circ 2}\\
     N &= \hat M / (\sqrt{\hat V} + \epsilon),\qquad
     U = \text{scale}\cdot S N + (X - S P)\,\mathrm{diag}(\phi),\quad
     \phi_j = \|N_{:,j}\| / (\|P_{:,j}\| + 10^{-8})

  with the recovery term's norm limited to ``norm_growth_limit`` times its
  previous norm. Leaves that are not matrices, or whose smaller side is
  ``<= rank``, get plain Adam (identical to :func:`optax.scale_by_adam`).
  The output is a descent direction (no learning rate, no sign flip).

  The subspace update is one real branch on the scalar step count (per leaf,
  with its own phase, if ``stagger``): a zero-or-one-trip
  :func:`jax.lax.while_loop` around a :func:`jax.lax.switch` between the first
  basis and a refresh, so a regular step touches no basis. All factorizations
  are of ``r x r`` (or ``2r x 2r``) matrices and are matmul-only.

  Products with a gradient (``S^T X``, and ``X (X^T Q)`` in the subspace
  update) run at JAX's default matmul precision (float32 on CPU; one
  bfloat16 pass on TPU); the small factorizations at ``HIGHEST``. Trace the
  update under ``jax.default_matmul_precision("highest")`` for float32
  passes everywhere.

  Args:
    rank: projection rank ``r`` (static).
    update_interval: ``k``, steps between subspace updates.
    subspace_update: ``"grassmann"`` (SubTrack geodesic tracking), ``"svd"``
      (GaLore), ``"random"`` (GoLore) or ``"frozen"`` (first basis kept).
    step_size: geodesic step size (radians per unit of normalized gradient
      when ``normalize_tracking``).
    normalize_tracking: track with ``X / ||X||_F`` so ``step_size`` bounds the
      rotation angle; ``False`` is the paper's raw step.
    scale: factor on the back-projected Adam direction.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(v_hat)``.
    transport_moments: rotate the moments into the new basis when it changes:
      ``True`` (= ``"ldadam"``), ``False``, or a named form, ``"ldadam"``,
      ``"debiased"``, ``"reference"`` or ``"reset"``
      (:func:`~subtrack_optax._equations.transport_moments`).
    recovery_scaling: add the discarded gradient, scaled per column:
      ``True`` (= ``"orthogonal"``, the residual ``X - S S^T X``),
      ``False``, or ``"reference"`` (the reference code's residual
      ``X - scale S S^T X``).
    norm_growth_limit: ``zeta``, the recovery norm's maximum growth per step.
    basis_side: ``"small"`` (the paper's: the smaller side) or ``"large"``.
    dimension_numbers: ``None``, a :class:`SubTrackDimensionNumbers` (for all
      leaves with ``ndim >= 2``), a pytree prefix of the params with specs or
      ``None`` (dense) leaves, or a callable ``params -> such a pytree`` (in
      ``update`` it receives the updates, which have the params' shapes).
    basis_dtype: dtype of the stored bases.
    mu_dtype: dtype of the first moments (default: the parameter dtype).
    seed: seed of the ``"random"`` mode (keyed by leaf path and step).
    stagger: give each projected leaf its own phase in the ``k``-step window,
      so that no single step refreshes every leaf.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import subtrack_optax as st
    >>> params = {"w": jnp.ones((32, 64)), "b": jnp.zeros((64,))}
    >>> tx = optax.chain(st.subtrack(rank=4), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> updates["w"].shape
    (32, 64)

  References:
    Rajabi, Nonta & Rambhatla, *SubTrack++: Gradient Subspace Tracking for
    Scalable LLM Training*, NeurIPS 2025 (arXiv 2502.01586);
    Zhao et al., *GaLore*, ICML 2024 (arXiv 2403.03507);
    Robert et al., *LDAdam*, ICLR 2025; Chen et al., *Fira* (arXiv 2410.01623).
  """
  cfg = _config.Config.create(
      rank, update_interval, subspace_update=subspace_update,
      step_size=step_size, normalize_tracking=normalize_tracking, scale=scale,
      b1=b1, b2=b2, eps=eps, transport_moments=transport_moments,
      recovery_scaling=recovery_scaling, norm_growth_limit=norm_growth_limit,
      basis_side=basis_side, dimension_numbers=dimension_numbers,
      basis_dtype=basis_dtype, mu_dtype=mu_dtype, seed=seed, stagger=stagger)
  dense_adam = optax.scale_by_adam(b1, b2, eps, mu_dtype=cfg.mu_dtype)
  # Eager calls (outside any jit) reuse one compiled update per shapes.
  eager = jax.jit(lambda updates, state: _update(cfg, dense_adam, updates,
                                                 state))

  def init_fn(params):
    return _init(cfg, params)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if _traced(cfg, updates, state):
      return _update(cfg, dense_adam, updates, state)
    return eager(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _traced(cfg: _config.Config, *trees) -> bool:
  """Whether the update is being traced (inside a jit, grad, vmap, ...) or
  takes traced hyperparameters (``optax.inject_hyperparams``)."""
  return bool(cfg.traced_hyperparameters()) or any(
      isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _init_leaf(cfg: _config.Config, plan: _plans.LeafPlan, param) -> tuple:
  """``(mu, nu, basis, recovery_norm)`` zeros of one leaf.

  Under explicit sharding they get the ``partition_specs`` layout.
  """
  sh = _sharding.init_shardings(plan, param)
  dtype = jnp.result_type(param)
  mu_dtype = cfg.mu_dtype or dtype
  if not plan.projected:
    zeros = lambda dt: jnp.zeros(jnp.shape(param), dt,
                                 out_sharding=sh.moments)
    return zeros(mu_dtype), zeros(dtype), MASKED, MASKED
  moments = plan.batch_shape + (cfg.rank, plan.big_d)
  return (jnp.zeros(moments, mu_dtype, out_sharding=sh.moments),
          jnp.zeros(moments, dtype, out_sharding=sh.moments),
          jnp.zeros(plan.batch_shape + (plan.d, cfg.rank), cfg.basis_dtype,
                    out_sharding=sh.basis),
          jnp.zeros(plan.batch_shape, jnp.float32,
                    out_sharding=sh.recovery_norm))


def _init(cfg: _config.Config, params) -> SubTrackState:
  """Zero moments and bases, count 0, the leaf plans of ``params``.

  Parameters boxed in Flax NNX ``Variable`` objects (``nnx.Optimizer``) give a
  state boxed alike, each box carrying its own leaf's partition spec
  (:mod:`subtrack_optax._variables`).
  """
  arrays = _variables.unbox(params)
  plans = cfg.plans(arrays)
  flat_plans, treedef = jax.tree.flatten(plans, is_leaf=_plans.is_plan)
  leaves = [_init_leaf(cfg, pl, p)
            for pl, p in zip(flat_plans, treedef.flatten_up_to(arrays))]
  columns = list(zip(*leaves)) or [()] * 4  # no leaves: empty fields
  fields = tuple(treedef.unflatten(c) for c in columns)
  warning = _plans.dense_warning(flat_plans)
  if warning:
    warnings.warn(warning, UserWarning, stacklevel=_user_stacklevel())
  if _variables.has_variables(params):
    fields = _variables.rebox(params, flat_plans, fields,
                              _sharding.mesh_sizes(None, arrays))
  # No leaves (e.g. optax.tree.map_params' placeholder): no plans to carry.
  plans = _plans.Plans(treedef, tuple(flat_plans)) if flat_plans else None
  return SubTrackState(jnp.zeros([], jnp.int32), *fields, plans=plans)


def _user_stacklevel() -> int:
  """``stacklevel`` of the first caller outside subtrack_optax, optax and
  jax (a warning then points at the user's ``init`` call)."""
  libraries = tuple(os.path.dirname(m.__file__) for m in (jax, optax)) + (
      os.path.dirname(__file__),)
  frame, level = sys._getframe(1), 1  # pylint: disable=protected-access
  while frame is not None and frame.f_code.co_filename.startswith(libraries):
    frame, level = frame.f_back, level + 1
  return level


def _check_state_matches(flat_plans, state: SubTrackState) -> None:
  """The state must come from this configuration and these shapes."""
  if state.plans is None:  # unpickled from before the state carried plans
    return
  stored = state.plans.geometry()
  now = _plans.Plans(None, tuple(flat_plans)).geometry()
  if len(stored) != len(now):
    raise ValueError(
        f"subtrack: the state was built for {len(stored)} leaves, the "
        f"updates have {len(now)} (a state from another model?)")
  for was, pl, named in zip(stored, now, flat_plans):
    if was != pl:
      pl = named
      raise ValueError(
          f"subtrack: leaf {pl.path} does not match the state: the state was "
          f"built for shape {was.shape} ({_describe(was)}), the update is "
          f"{pl.shape} ({_describe(pl)}); a checkpoint from a different "
          "configuration (rank, basis_side, dimension_numbers) or model?")


def _describe(plan: _plans.LeafPlan) -> str:
  if not plan.projected:
    return "dense"
  return (f"rank {plan.rank}, d={plan.d}, D={plan.big_d}, batch "
          f"{plan.batch_shape}")


def _update(cfg: _config.Config, dense_adam: optax.GradientTransformation,
            updates, state: SubTrackState):
  """The update: subspace update, then each leaf's step (dense: Adam)."""
  flat_plans, treedef = jax.tree.flatten(cfg.plans(updates),
                                         is_leaf=_plans.is_plan)
  _check_state_matches(flat_plans, state)
  gs, mus, nus, bases, prevs = (
      treedef.flatten_up_to(t) for t in (updates, state.mu, state.nu,
                                         state.basis, state.recovery_norm))
  count = state.count
  count_inc = numerics.safe_increment(count)
  proj = [i for i, pl in enumerate(flat_plans) if pl.projected]
  frames = [_frame.Frame(flat_plans[i]) for i in proj]

  # The state as stored: under explicit sharding the sweeps gather each
  # item's r-axis shards when they reach it.
  leaves = _engine.Leaves(*([t[i] for i in proj]
                            for t in (gs, bases, mus, nus, prevs)))
  leaves = _engine.update_projected(cfg, count, count_inc, frames, leaves)

  # Dense leaves: optax.scale_by_adam itself, on the tree whose projected
  # leaves are masked out, so its arithmetic is shared, not re-implemented.
  dense = lambda t: treedef.unflatten(
      [MASKED if pl.projected else x for pl, x in zip(flat_plans, t)])
  dense_u, dense_state = dense_adam.update(
      dense(gs), optax.ScaleByAdamState(count, dense(mus), dense(nus)))
  out_u, out_mu, out_nu = (list(treedef.flatten_up_to(t)) for t in (
      dense_u, dense_state.mu, dense_state.nu))
  out_basis, out_prev = list(bases), list(prevs)
  for j, i in enumerate(proj):
    out_u[i], out_basis[i], out_mu[i], out_nu[i], out_prev[i] = (
        t[j] for t in leaves)

  # A state without plans (unpickled from an old file, or mapped by
  # optax.tree.map_params) gets them back from the updates.
  plans = state.plans or _plans.Plans(treedef, tuple(flat_plans))
  new_state = SubTrackState(count_inc, *(treedef.unflatten(t) for t in (
      out_mu, out_nu, out_basis, out_prev)), plans=plans)
  # Explicit sharding only: back to the stored layouts (local slices).
  like = lambda a, b: jax.tree.map(_sharding.like, a, b)
  return like(treedef.unflatten(out_u), updates), like(new_state, state)


def subtrack_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_interval: int = 200,
    *,
    weight_decay: float = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    subspace_update: str = "grassmann",
    step_size: float = 0.25,
    normalize_tracking: bool = True,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    transport_moments: Union[bool, str] = True,
    recovery_scaling: Union[bool, str] = True,
    norm_growth_limit: float = 1.01,
    basis_side: str = "small",
    dimension_numbers: Any = None,
    basis_dtype: Any = jnp.float32,
    mu_dtype: Optional[Any] = None,
    seed: int = 0,
    stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SubTrack++ with decoupled weight decay and a learning rate.

  ``chain(subtrack(rank, update_interval, ...),
  add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``.
  Every argument is explicit, so ``optax.inject_hyperparams`` can inject
  the learning rate, the weight decay and the float hyperparameters; the
  shape- and control-flow-fixing ones go in its ``static_args``
  (:data:`STATIC_ARGS`).

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: projection rank.
    update_interval: steps between subspace updates.
    weight_decay: decoupled weight decay.
    mask: weight decay mask (as in :func:`optax.adamw`).
    subspace_update: see :func:`subtrack` (and every argument below).
    step_size: geodesic step size.
    normalize_tracking: track with the normalized gradient.
    scale: factor on the back-projected Adam direction.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's epsilon.
    transport_moments: the moment transport (or its named form).
    recovery_scaling: the recovery term (or its named form).
    norm_growth_limit: the recovery limiter's growth bound.
    basis_side: ``"small"`` or ``"large"``.
    dimension_numbers: which axes form each matrix.
    basis_dtype: dtype of the stored bases.
    mu_dtype: dtype of the first moments.
    seed: seed of the ``"random"`` mode.
    stagger: per-leaf phases of the subspace updates.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, subtrack_optax as st
    >>> tx = st.subtrack_adamw(1e-3, rank=4, weight_decay=0.01)
    >>> state = tx.init({"w": jnp.ones((16, 32))})
    >>> tx = optax.inject_hyperparams(st.subtrack_adamw,
    ...                               static_args=st.STATIC_ARGS)(
    ...     learning_rate=1e-3, rank=4)
  """
  return optax.chain(
      subtrack(rank, update_interval, subspace_update=subspace_update,
               step_size=step_size, normalize_tracking=normalize_tracking,
               scale=scale, b1=b1, b2=b2, eps=eps,
               transport_moments=transport_moments,
               recovery_scaling=recovery_scaling,
               norm_growth_limit=norm_growth_limit, basis_side=basis_side,
               dimension_numbers=dimension_numbers, basis_dtype=basis_dtype,
               mu_dtype=mu_dtype, seed=seed, stagger=stagger),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
