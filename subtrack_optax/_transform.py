"""The SubTrack++ gradient transformation."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics
from optax._src import utils as optax_utils

from subtrack_optax import _dimension_numbers as dn
from subtrack_optax import _linalg
from subtrack_optax import _sharding
from subtrack_optax import _tracking

__all__ = [
    "SubTrackState",
    "subtrack",
    "subtrack_adamw",
    "SUBSPACE_UPDATES",
    "STATIC_ARGS",
]

SUBSPACE_UPDATES = ("grassmann", "svd", "random", "frozen")
BASIS_SIDES = ("small", "large")
# Arguments that fix shapes or Python control flow; pass them as
# ``static_args`` to ``optax.inject_hyperparams``.
STATIC_ARGS = ("rank", "update_interval", "subspace_update",
               "normalize_tracking", "transport_moments", "recovery_scaling",
               "basis_side", "dimension_numbers", "basis_dtype", "mu_dtype",
               "seed", "stagger")

_MASKED = optax.MaskedNode()


class SubTrackState(NamedTuple):
  """State of :func:`subtrack`.

  Every field but ``count`` has the structure of the parameters. For a
  projected matrix leaf of canonical shape ``(batch..., d, D)``:
  ``mu``/``nu`` are ``(batch..., r, D)``, ``basis`` is ``(batch..., d, r)``
  and ``recovery_norm`` is ``(batch...)`` (float32). For a dense leaf
  ``mu``/``nu`` have the leaf's shape and ``basis``/``recovery_norm`` hold
  ``optax.MaskedNode()``.

  Attributes:
    count: int32 number of updates applied so far.
    mu: first moments (in ``mu_dtype``, else the parameter dtype).
    nu: second moments (parameter dtype).
    basis: orthonormal bases (``basis_dtype``).
    recovery_norm: norm of the last recovery term, for the growth limiter.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  basis: optax.Updates
  recovery_norm: optax.Updates


def _is_real_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(name, value, ok, accepted):
  """Validates a Python number; traced/array values are left alone."""
  if _is_real_number(value) and not ok(value):
    raise ValueError(f"subtrack: {name} must be {accepted}, got {value!r}")


def _validate(rank, update_interval, subspace_update, step_size, scale, b1,
              b2, eps, norm_growth_limit, basis_side, seed, dimension_numbers):
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
    raise ValueError(f"subtrack: rank must be a positive int, got {rank!r}")
  if rank <= 0:
    raise ValueError(f"subtrack: rank must be a positive int, got {rank!r}")
  if (isinstance(update_interval, bool)
      or not isinstance(update_interval, numbers.Integral)
      or update_interval <= 0):
    raise ValueError("subtrack: update_interval must be a positive int, got "
                     f"{update_interval!r}")
  if subspace_update not in SUBSPACE_UPDATES:
    raise ValueError(f"subtrack: subspace_update must be one of "
                     f"{SUBSPACE_UPDATES}, got {subspace_update!r}")
  if basis_side not in BASIS_SIDES:
    raise ValueError(f"subtrack: basis_side must be one of {BASIS_SIDES}, got "
                     f"{basis_side!r}")
  _check("step_size", step_size, lambda v: v >= 0, ">= 0")
  _check("scale", scale, lambda v: v > 0, "> 0")
  _check("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("eps", eps, lambda v: v >= 0, ">= 0")
  _check("norm_growth_limit", norm_growth_limit, lambda v: v >= 1, ">= 1")
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"subtrack: seed must be an int, got {seed!r}")
  if not (dimension_numbers is None or callable(dimension_numbers)
          or isinstance(dimension_numbers, (dn.SubTrackDimensionNumbers, dict,
                                            list, tuple))
          or jax.tree_util.all_leaves([dimension_numbers])):
    raise ValueError("subtrack: dimension_numbers must be None, a "
                     "SubTrackDimensionNumbers, a pytree of them (None = "
                     f"dense) or a callable, got {dimension_numbers!r}")


def _is_plan(x) -> bool:
  return isinstance(x, dn.LeafPlan)


def subtrack(
    rank: int,
    update_interval: int = 200,
    *,
    subspace_update: str = "grassmann",
    step_size: float = 0.5,
    normalize_tracking: bool = True,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    transport_moments: bool = True,
    recovery_scaling: bool = True,
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
    transport_moments: rotate the moments into the new basis when it changes.
    recovery_scaling: add the discarded gradient, scaled per column.
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
  _validate(rank, update_interval, subspace_update, step_size, scale, b1, b2,
            eps, norm_growth_limit, basis_side, seed, dimension_numbers)
  rank = int(rank)
  mu_dtype = optax_utils.canonicalize_dtype(mu_dtype)
  basis_dtype = jnp.dtype(basis_dtype)
  # A stored float32 (or wider) basis is orthonormal to rounding, so the
  # recovery norm needs no r x r Gram correction (see _projected_step).
  gram_correction = basis_dtype.itemsize < 4
  dense_adam = optax.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype)
  plans_of = functools.partial(dn.resolve_plans,
                               dimension_numbers=dimension_numbers, rank=rank,
                               basis_side=basis_side)

  def init_fn(params):
    plans = plans_of(params)

    def moments(plan, p, dtype):
      # Under explicit sharding the zeros get the partition_specs layout.
      out_sharding = _sharding.init_sharding(plan, p, 0)
      if not plan.projected:
        return jnp.zeros(jnp.shape(p), dtype or jnp.result_type(p),
                         out_sharding=out_sharding)
      return jnp.zeros(plan.batch_shape + (rank, plan.big_d),
                       dtype or jnp.result_type(p), out_sharding=out_sharding)

    def basis(plan, p):
      if not plan.projected:
        return _MASKED
      return jnp.zeros(plan.batch_shape + (plan.d, rank), basis_dtype,
                       out_sharding=_sharding.init_sharding(plan, p, 1))

    def recovery(plan, p):
      if not plan.projected:
        return _MASKED
      return jnp.zeros(plan.batch_shape, jnp.float32,
                       out_sharding=_sharding.init_sharding(plan, p, 2))

    tm = functools.partial(jax.tree.map, is_leaf=_is_plan)
    state = SubTrackState(
        count=jnp.zeros([], jnp.int32),
        mu=tm(lambda pl, p: moments(pl, p, mu_dtype), plans, params),
        nu=tm(lambda pl, p: moments(pl, p, None), plans, params),
        basis=tm(basis, plans, params),
        recovery_norm=tm(recovery, plans, params),
    )
    _sharding.record_init(state, plans)  # for subtrack_optax.partition_specs
    return state

  # ---- subspace update: the first basis or a refresh, on the step count ---
  # Each branch maps lists of leaves that share a canonical shape (d, D) (a
  # "group"), so the loops of the factorizations are traced once per group.

  # Every branch also returns the projections ``P = S^T X`` on the new
  # basis (``ps`` holds them on the old one), so the step never projects
  # twice: a tracking step updates ``P`` in O(d D) (see _tracking).

  def first(plans, count, xs, ss, mus, nus, ps):
    del plans, count
    news = _linalg.top_left_singular_vectors_multi(xs, rank)
    news = [n.astype(s.dtype) for n, s in zip(news, ss)]
    return news, mus, nus, _reproject(news, xs, ps)

  def refresh(plans, count, xs, ss, mus, nus, ps):
    if subspace_update == "frozen":
      return ss, mus, nus, ps
    olds = [s.astype(jnp.float32) for s in ss]
    rotations = [None] * len(ss)
    new_ps = None
    if subspace_update == "grassmann":
      # Each X as the leaf lies (no transposed copy of a tall leaf).
      news, thetas, axes, new_ps = _tracking.grassmann_step_multi(
          olds, [_own_layout(x, pl) for x, pl in zip(xs, plans)], step_size,
          normalize_tracking, with_axis=True, projections=ps,
          transposed=[not pl.basis_on_reduction for pl in plans])
      rotations = list(zip(axes, thetas))
    elif subspace_update == "svd":
      news = _linalg.top_left_singular_vectors_multi(xs, rank)
    else:  # random: keyed by seed, leaf path and step count
      draws = []
      for plan in plans:
        key = jax.random.fold_in(jax.random.key(seed), plan.path_hash)
        key = jax.random.fold_in(key, count)
        draws.append(jax.random.normal(
            key, (math.prod(plan.batch_shape), plan.d, rank), jnp.float32))
      q = _linalg.householder_orthonormalize(jnp.concatenate(draws))
      q = jnp.split(q, np.cumsum([len(g) for g in draws])[:-1])
      news = [qi.reshape(s.shape) for qi, s in zip(q, ss)]
    outs = []
    for x, old, new, mu, nu, s, rot in zip(xs, olds, news, mus, nus, ss,
                                           rotations):
      if subspace_update != "grassmann":  # grassmann checks this itself
        finite = jnp.all(jnp.isfinite(x), axis=(-2, -1))[..., None, None]
        new = jnp.where(finite, new, old)
      if transport_moments:
        mu, nu = _transport(new, old, mu, nu, rotation=rot)
      outs.append((new.astype(s.dtype), mu, nu))
    news, mus, nus = (list(o) for o in zip(*outs))
    if new_ps is None or gram_correction:
      # A basis stored narrower than float32 is rounded after the step:
      # project on what is stored, so P and the back-projection agree.
      new_ps = _reproject(news, xs, ps)
    return news, mus, nus, new_ps

  # Branch index 0 (no update) is the loop of _run_if_due that does not run.
  branches = {1: first, 2: refresh}

  def branch_index(count, phase):
    due = (count >= phase) & ((count - phase) % update_interval == 0)
    return jnp.where(count == 0, 1, jnp.where(due, 2, 0)).astype(jnp.int32)

  def subspace_update_all(plans, count, gs, bases, mus, nus, ps):
    """Applies the subspace update to every projected leaf.

    ``gs`` are the leaves as given; each branch forms their canonical frame.
    ``ps`` are the projections on the current bases; returns the trees
    ``(bases, mus, nus, ps)`` after the update.
    """
    plan_list, treedef = jax.tree.flatten(plans, is_leaf=_is_plan)
    flat = [treedef.flatten_up_to(t) for t in (gs, bases, mus, nus, ps)]
    proj = [i for i, p in enumerate(plan_list) if p.projected]
    if stagger:  # one group (and one switch) per leaf, each its own phase
      groups = [[i] for i in proj]
    else:
      by_key = {}
      for i in proj:
        key = (plan_list[i].d, plan_list[i].big_d,
               _sharding_key(dn.to_canonical(flat[0][i], plan_list[i])),
               flat[1][i].dtype, flat[2][i].dtype,
               flat[3][i].dtype)
        by_key.setdefault(key, []).append(i)
      groups = list(by_key.values())

    def run(which, pls, groups, *operands):
      """Branch ``which`` on ``operands`` (lists aligned with ``pls``)."""
      # The canonical frame is formed here, inside the branch, so a step
      # that does not update the subspace never copies a transposed leaf.
      operands = ([dn.to_canonical(g, pl) for g, pl in zip(operands[0], pls)],
                  *operands[1:])
      out = [list(o) for o in operands[1:]]
      for g in groups:
        got = branches[which]([pls[j] for j in g], count,
                              *[[o[j] for j in g] for o in operands])
        for t in range(4):
          for j, v in zip(g, got[t]):
            out[t][j] = v
      return out

    operands = [[f[i] for i in proj] for f in flat]
    pos = {i: j for j, i in enumerate(proj)}
    groups = [[pos[i] for i in g] for g in groups]
    # Branches 1 (first) and 2 (refresh) run inside _run_if_due; "keep" is
    # the loop that does not run.
    if not stagger:
      new = _run_if_due(
          branch_index(count, 0),
          [functools.partial(run, w, [plan_list[i] for i in proj], groups)
           for w in (1, 2)], operands[0], operands[1:])
    else:
      n_proj = max(len(proj), 1)
      new = [[], [], [], []]
      for g in groups:
        phase = (g[0] * update_interval) // n_proj
        got = _run_if_due(
            branch_index(count, phase),
            [functools.partial(run, w, [plan_list[proj[g[0]]]], [[0]])
             for w in (1, 2)],
            [operands[0][g[0]]], [[o[g[0]]] for o in operands[1:]])
        for t in range(4):
          new[t].append(got[t][0])
    result = [list(f) for f in flat[1:]]
    for j, i in enumerate(proj):
      for t in range(4):
        result[t][i] = new[t][j]
    return tuple(treedef.unflatten(r) for r in result)

  def update_fn(updates, state, params=None):
    del params
    plans = plans_of(updates)
    count = state.count
    count_inc = numerics.safe_increment(count)
    tm = functools.partial(jax.tree.map, is_leaf=_is_plan)

    xs = tm(lambda pl, g: dn.to_canonical(g, pl) if pl.projected else _MASKED,
            plans, updates)
    # Explicit sharding only: all-gather the r-axis shards of the state
    # (d x r and r x D pieces) for the update; a no-op otherwise.
    bases, mus, nus = _map_projected(
        plans, lambda pl, *a: _sharding.to_compute_layout(*a), xs,
        state.basis, state.mu, state.nu)
    # P = S^T X on the current bases; a subspace update replaces it.
    ps = tm(lambda pl, x, s: (_project(_own_layout(x, pl), s,
                                       pl.basis_on_reduction)
                              if pl.projected else _MASKED),
            plans, xs, bases)
    bases, mus, nus, ps = subspace_update_all(plans, count, updates, bases,
                                              mus, nus, ps)

    # Dense leaves: optax.scale_by_adam itself, on the tree whose projected
    # leaves are masked out, so its arithmetic is shared, not re-implemented.
    dense = lambda t: tm(lambda pl, x: _MASKED if pl.projected else x, plans, t)
    dense_u, dense_state = dense_adam.update(
        dense(updates), optax.ScaleByAdamState(count, dense(mus), dense(nus)))

    def leaf_update(plan, g, x, s, mu, nu, p, prev, du, dmu, dnu):
      if not plan.projected:
        return du, dmu, dnu, _MASKED
      u, mu_new, nu_new, prev_new = _projected_step(
          _own_layout(x, plan), s.astype(jnp.float32),
          mu.astype(jnp.float32), nu.astype(jnp.float32), prev, count,
          count_inc, p=p, basis_rows=plan.basis_on_reduction, b1=b1, b2=b2,
          eps=eps, scale=scale, recovery=recovery_scaling,
          zeta=norm_growth_limit, gram=gram_correction)
      return (dn.from_canonical(_own_layout(u, plan), plan, g.dtype),
              mu_new.astype(mu.dtype), nu_new.astype(nu.dtype), prev_new)

    out = tm(leaf_update, plans, updates, xs, bases, mus, nus, ps,
             state.recovery_norm, dense_u, dense_state.mu, dense_state.nu)
    pick = lambda i: tm(lambda pl, o: o[i], plans, out)
    new_state = SubTrackState(count=count_inc, mu=pick(1), nu=pick(2),
                              basis=bases, recovery_norm=pick(3))
    # Explicit sharding only: back to the stored layouts (local slices).
    like = functools.partial(jax.tree.map, _sharding.like)
    return like(pick(0), updates), like(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _run_if_due(idx, branch_fns, x, carry):
  """``branch_fns[idx - 1](x, *carry)`` if ``idx > 0``, else ``carry``.

  A ``while_loop`` of zero or one trip on the scalar ``idx`` (a real branch,
  never a select), the branch chosen by a switch inside the loop body.
  Unlike a conditional with an identity branch, which XLA compiles to a copy
  of every operand, a loop that does not run touches nothing: on a regular
  step the bases and moments stay where they are (updated in place when the
  state is donated), and only a step that updates the subspace pays for it.
  """
  trips = (idx > 0).astype(jnp.int32)

  def body(loop):
    i, carry = loop
    if len(branch_fns) == 1:
      carry = branch_fns[0](x, *carry)
    else:
      carry = jax.lax.switch(idx - 1, branch_fns, x, *carry)
    return i + 1, tuple(carry)

  _, carry = jax.lax.while_loop(lambda loop: loop[0] < trips, body,
                                (jnp.zeros([], jnp.int32), tuple(carry)))
  return carry


def _sharding_key(x):
  """The explicit sharding of ``x`` (``None`` in Auto mode / unsharded)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  return None if sharding is None else str(getattr(sharding, "spec", None))


def _map_projected(plans, fn, xs, bases, mus, nus):
  """Maps ``fn`` over projected leaves; dense leaves pass through.

  Returns the tuple ``(bases, mus, nus)`` of trees.
  """
  out = jax.tree.map(
      lambda pl, x, s, m, v: fn(pl, x, s, m, v) if pl.projected else (s, m, v),
      plans, xs, bases, mus, nus, is_leaf=_is_plan)
  return tuple(
      jax.tree.map(lambda pl, o: o[i], plans, out, is_leaf=_is_plan)
      for i in range(3))


def _own_layout(x, plan):
  """The canonical ``X`` back in the leaf's own ``(batch..., m, n)`` order.

  For a basis on the output side the two swaps (this one and the one in
  ``to_canonical``) cancel: no transposed copy is made.
  """
  return x if plan.basis_on_reduction else jnp.swapaxes(x, -1, -2)


def _project(g, s, basis_rows):
  """``P = S^T X`` (``(batch..., r, D)``, float32) with ``g`` as it lies.

  ``g`` is the matrix in its own layout ``(batch..., m, n)``; ``X = g`` if
  ``basis_rows`` else ``X = g^T``. The optimization barriers only pin the
  orientation of the product: untransposed (row-major) operands, which
  XLA:CPU runs fastest, instead of XLA folding the (small) transposes back
  into the product; neither ``g`` nor ``P`` is copied transposed.
  """
  s = s.astype(jnp.float32)
  bar = jax.lax.optimization_barrier
  if basis_rows:                                     # X = g: (d, D)
    return _sharding.matmul(bar(jnp.swapaxes(s, -1, -2)), g)
  # X = g^T, g: (D, d): P^T = g S, a plain (D, d) x (d, r) product.
  return jnp.swapaxes(bar(_sharding.matmul(g, s)), -1, -2)


def _reproject(news, xs, ps):
  """``S^T X`` for new bases ``S`` and canonical ``X`` (like ``ps``)."""
  return [_sharding.like(_sharding.matmul(
      jnp.swapaxes(s.astype(jnp.float32), -1, -2), x), p)
          for s, x, p in zip(news, xs, ps)]


def _transport(s_new, s_old, mu, nu, rotation=None):
  """Projection-aware moment transport (LDAdam form).

  ``C = S_new^T S_old``; ``M' = C M``;
  ``V' = max(C∘C (V - M∘M) + (C M)∘(C M), 0)``.

  ``rotation=(v, theta)`` says that ``S_new`` is ``S_old`` turned by the
  angle ``theta`` about the unit axis ``v`` of a rank-1 geodesic step, for
  which ``C = I + beta v v^T`` exactly (``beta = cos(theta) - 1``; see
  :func:`~subtrack_optax._tracking.grassmann_step_multi`). Then, with
  ``w = v∘v``, ``C M = M + beta v (v^T M)`` and
  ``(C∘C) Z = Z + 2 beta w∘Z + beta^2 w (w^T Z)`` (rows scaled by ``w``):
  ``O(r D)`` work instead of two ``r x r x D`` products, and no ``C``.
  """
  m32 = mu.astype(jnp.float32)
  v32 = nu.astype(jnp.float32)
  z = v32 - m32 * m32
  if rotation is None:
    c = _linalg.matmul(jnp.swapaxes(s_new, -1, -2), s_old)
    cm = _linalg.matmul(c, m32)
    ccz = _linalg.matmul(c * c, z)
  else:
    axis, theta = rotation
    axis = axis.astype(jnp.float32)[..., :, None]               # (r, 1)
    # cos(theta) - 1 without cancellation for small angles.
    beta = (-2.0 * jnp.sin(0.5 * theta) ** 2)[..., None, None]
    w = axis * axis
    cm = m32 + beta * axis * jnp.sum(axis * m32, axis=-2, keepdims=True)
    ccz = (z + 2.0 * beta * w * z
           + beta * beta * w * jnp.sum(w * z, axis=-2, keepdims=True))
  v_new = ccz + cm * cm
  return cm.astype(mu.dtype), jnp.maximum(v_new, 0.0).astype(nu.dtype)


def _projected_step(g, s, mu, nu, prev, count, count_inc, *, p, basis_rows,
                    b1, b2, eps, scale, recovery, zeta, gram):
  """Adam in the subspace, back-projection and recovery scaling (float32).

  ``g`` is the matrix in its own layout ``(batch..., m, n)``; the canonical
  frame is ``X = g`` if ``basis_rows`` else ``X = g^T``; ``p = S^T X``
  (:func:`_project`). The back-projection takes ``g`` as it lies in memory,
  so neither ``g`` nor the update is ever transposed (copied). The
  recovery term is folded into the
  back-projection, ``U = S (scale N - phi P) + phi X`` (one matmul), and its
  norm comes from column norms, ``||X_j - S P_j||^2 = ||X_j||^2 -
  2||P_j||^2 + P_j^T (S^T S) P_j``, without forming the ``d x D`` residual.
  A basis stored in float32 or wider (``gram=False``) is orthonormal to
  rounding, ``S^T S = I``, and the last two terms are ``-||P_j||^2``: this
  saves an ``r x r x D`` product per step; narrower stored bases (bfloat16)
  keep the Gram correction.
  """
  mm = _linalg.matmul
  st = jnp.swapaxes(s, -1, -2)
  if basis_rows:                                     # X = g: (d, D)
    back = lambda w: jnp.matmul(s, w)                # (d, D)
    col = lambda v: v[..., None, :]                  # X's column j = g[:, j]
  else:                                              # X = g^T, g: (D, d)
    back = lambda w: jnp.matmul(jnp.swapaxes(w, -1, -2), st)   # (D, d)
    col = lambda v: v[..., :, None]                  # X's column j = g[j, :]
  mu = (1 - b1) * p + b1 * mu
  nu = (1 - b2) * (p * p) + b2 * nu
  c = count_inc.astype(jnp.float32)
  mu_hat = mu / (1 - jnp.asarray(b1, jnp.float32) ** c)
  nu_hat = nu / (1 - jnp.asarray(b2, jnp.float32) ** c)
  n = mu_hat / (jnp.sqrt(nu_hat) + eps)
  if not recovery:
    return scale * back(n), mu, nu, prev
  # Column norms ||X_j||^2, ||P_j||^2, ||N_j||^2.
  x_sq = jnp.sum(g * g, axis=-2 if basis_rows else -1)
  p_sq = jnp.sum(p * p, axis=-2)
  n_sq = jnp.sum(n * n, axis=-2)
  if gram:
    gp = mm(mm(st, s), p)
    resid_sq = x_sq - 2.0 * p_sq + jnp.sum(p * gp, axis=-2)
  else:
    resid_sq = x_sq - p_sq
  resid_sq = jnp.maximum(resid_sq, 0.0)
  phi = jnp.sqrt(n_sq) / (jnp.sqrt(p_sq) + 1e-8)
  lam = jnp.sqrt(jnp.sum(phi * phi * resid_sq, axis=-1))   # (batch...)
  limit = (count > 0) & (lam > zeta * prev)
  factor = jnp.where(limit, zeta * prev / jnp.where(limit, lam, 1.0), 1.0)
  phi = phi * factor[..., None]
  u = back(scale * n - phi[..., None, :] * p) + col(phi) * g
  return u, mu, nu, (lam * factor).astype(jnp.float32)


def subtrack_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_interval: int = 200,
    *,
    weight_decay: float = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    **subtrack_kwargs,
) -> optax.GradientTransformationExtraArgs:
  """SubTrack++ with decoupled weight decay and a learning rate.

  ``chain(subtrack(rank, update_interval, **subtrack_kwargs),
  add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: projection rank.
    update_interval: steps between subspace updates.
    weight_decay: decoupled weight decay.
    mask: weight decay mask (as in :func:`optax.adamw`).
    **subtrack_kwargs: any keyword argument of :func:`subtrack`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, subtrack_optax as st
    >>> tx = st.subtrack_adamw(1e-3, rank=4, weight_decay=0.01)
    >>> state = tx.init({"w": jnp.ones((16, 32))})
  """
  return optax.chain(
      subtrack(rank, update_interval, **subtrack_kwargs),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
