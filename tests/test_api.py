"""Optax citizenship: API, composition, dtypes, dimension numbers, errors."""

import functools
import inspect

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subtrack_optax as st

R = 4
PARAMS = {
    "w": jnp.zeros((12, 20)),
    "scan": jnp.zeros((3, 10, 16)),
    "b": jnp.zeros((20,)),
    "thin": jnp.zeros((3, 40)),
}


def _grads(seed, params=PARAMS):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


@functools.lru_cache(maxsize=None)
def _tx(*args, **kwargs):
  """One transform (and so one compiled update per shape) per config."""
  return st.subtrack(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _jit(fn):
  return jax.jit(fn)


def _run(tx, steps, params=PARAMS):
  state = tx.init(params)
  update = _jit(tx.update)
  outs = []
  for t in range(steps):
    u, state = update(_grads(t, params), state, params)
    outs.append(u)
  return outs, state


def _assert_rel_close(actual, desired, tol):
  """Norm-wise relative error (float32 rounding differs between batched and
  unbatched programs element by element)."""
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  err = np.linalg.norm(a - d) / np.linalg.norm(d)
  assert err <= tol, f"relative error {err} > {tol}"


def test_public_names():
  for name in ["subtrack", "subtrack_adamw", "SubTrackDimensionNumbers",
               "SubTrackState"]:
    assert hasattr(st, name)
  tx = st.subtrack(R)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = tx.init(PARAMS)
  assert isinstance(state, st.SubTrackState)
  assert state.count.dtype == jnp.int32


def test_eval_shape_init_and_state_consistent_across_branches():
  tx = _tx(R, 2)
  shapes = jax.eval_shape(tx.init, PARAMS)
  outs, state = _run(tx, 3)
  same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype),
                      shapes, state)
  assert all(jax.tree.leaves(same))


def _count_conds(jaxpr):
  """Conditionals outside any conditional's branches (nested jaxprs of
  pjit/closed calls included)."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      n += 1
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_conds(sub)
  return n


@pytest.mark.parametrize("stagger", [False, True])
def test_subspace_update_is_one_conditional_per_group(stagger):
  """One switch (first basis / refresh) per group of same-shape matrices,
  shared by all of the group's leaves and batch slices, with or without
  stagger; its predicate is a scalar (no batched select of bases)."""
  tx = st.subtrack(R, stagger=stagger)
  state = tx.init(PARAMS)
  jaxpr = jax.make_jaxpr(tx.update)(PARAMS, state).jaxpr
  # "w" (12, 20) and "scan" (3 x (10, 16)): two groups of one leaf each, so
  # no switch picks a leaf; each group has its gate's switch.
  assert _count_conds(jaxpr) == 2
  for e in _conds(jaxpr):
    assert e.invars[0].aval.shape == ()


def _conds(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      out.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _conds(sub)
  return out


def test_no_recompilation_between_steps():
  tx = st.subtrack(R, update_interval=2)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for t in range(5):
    _, state = update(_grads(t), state, PARAMS)
  assert update._cache_size() == 1


def test_eager_update_compiles_once(monkeypatch):
  """An un-jitted ``tx.update`` (a notebook's eager loop) traces and
  compiles the update once per transform and shapes; later eager calls
  reuse it, and give the jitted update's results exactly (issue 13.5)."""
  from subtrack_optax import _transform  # pylint: disable=g-import-not-at-top
  traces = []
  original = _transform._update

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(_transform, "_update", counting)
  tx = st.subtrack(R, update_interval=2)
  state = tx.init(PARAMS)
  eager = []
  for t in range(4):  # first basis, regular, refresh, regular
    u, state = tx.update(_grads(t), state, PARAMS)
    eager.append(u)
  assert len(traces) == 1
  jitted, _ = _run(tx, 4)
  for a, b in zip(eager, jitted):
    chex.assert_trees_all_equal(a, b)


def test_dense_leaves_identical_to_scale_by_adam():
  tx = _tx(R, 2)
  adam = optax.scale_by_adam()
  outs, _ = _run(tx, 4)
  ref, _ = _run(adam, 4)
  for o, a in zip(outs, ref):
    np.testing.assert_array_equal(o["b"], a["b"])
    np.testing.assert_array_equal(o["thin"], a["thin"])  # min side 3 <= R


def test_scanned_leaf_equals_independent_matrices():
  tx = _tx(R, 2)
  outs, _ = _run(tx, 4)
  for i in range(3):
    sliced = {"m": PARAMS["scan"][i]}
    state = tx.init(sliced)
    for t in range(4):
      u, state = _jit(tx.update)({"m": _grads(t)["scan"][i]}, state)
      _assert_rel_close(u["m"], outs[t]["scan"][i], 2e-5)


def test_attention_kernel_dimension_numbers_equal_reshaped_matrix():
  kernel = {"q": jnp.zeros((16, 2, 12))}  # (embed, heads, head_dim)
  spec = st.SubTrackDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  tx3 = st.subtrack(R, update_interval=2, dimension_numbers={"q": spec})
  tx2 = _tx(R, 2)
  s3, s2 = tx3.init(kernel), tx2.init({"q": jnp.zeros((16, 24))})
  assert s3.basis["q"].shape == (16, R)
  for t in range(3):
    g = _grads(t, kernel)
    u3, s3 = jax.jit(tx3.update)(g, s3)
    u2, s2 = jax.jit(tx2.update)({"q": g["q"].reshape(16, 24)}, s2)
    np.testing.assert_allclose(u3["q"].reshape(16, 24), u2["q"], rtol=1e-5,
                               atol=1e-6)


def test_transposed_axes_and_callable_dimension_numbers():
  params = {"k": jnp.zeros((20, 12)), "b": jnp.zeros((20,))}
  # reduction axis 1, output axis 0: the transpose of the default frame.
  fn = lambda p: {"k": st.SubTrackDimensionNumbers(1, 0), "b": None}
  tx_fn = st.subtrack(R, update_interval=2, dimension_numbers=fn)
  tx_t = _tx(R, 2)
  s1, s2 = tx_fn.init(params), tx_t.init({"k": jnp.zeros((12, 20))})
  for t in range(3):
    g = _grads(t, params)
    u1, s1 = _jit(tx_fn.update)(g, s1)
    u2, s2 = _jit(tx_t.update)({"k": g["k"].T}, s2)
    np.testing.assert_allclose(u1["k"], u2["k"].T, rtol=1e-5, atol=1e-6)
  assert isinstance(s1.basis["b"], optax.MaskedNode)


def test_pytree_prefix_dimension_numbers_with_none_is_dense():
  params = {"enc": {"w1": jnp.zeros((12, 20)), "w2": jnp.zeros((20, 12))},
            "head": jnp.zeros((12, 30))}
  dims = {"enc": st.SubTrackDimensionNumbers(0, 1), "head": None}
  state = st.subtrack(R, dimension_numbers=dims).init(params)
  assert state.basis["enc"]["w1"].shape == (12, R)
  assert state.basis["enc"]["w2"].shape == (12, R)
  assert isinstance(state.basis["head"], optax.MaskedNode)
  assert state.mu["head"].shape == (12, 30)


def test_single_spec_applies_to_matrices_only():
  dims = st.SubTrackDimensionNumbers(0, 1)
  state = st.subtrack(R, dimension_numbers=dims).init(
      {"w": jnp.zeros((12, 20)), "b": jnp.zeros((20,))})
  assert state.basis["w"].shape == (12, R)
  assert isinstance(state.basis["b"], optax.MaskedNode)


def test_bad_dimension_numbers_name_the_leaf():
  dims = {"w": st.SubTrackDimensionNumbers(0, 2)}
  with pytest.raises(ValueError, match=r"output_axis.*\['w'\]"):
    st.subtrack(R, dimension_numbers=dims).init({"w": jnp.zeros((12, 20))})
  with pytest.raises(ValueError, match="share an axis"):
    st.subtrack(R, dimension_numbers={"w": st.SubTrackDimensionNumbers(0, 0)}
                ).init({"w": jnp.zeros((12, 20))})
  with pytest.raises(ValueError, match="dimension_numbers"):
    st.subtrack(R, dimension_numbers={"x": None}).init({"w": jnp.zeros((4,))})


@pytest.mark.parametrize("kwargs,arg", [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(update_interval=0), "update_interval"),
    (dict(subspace_update="pca"), "subspace_update"),
    (dict(basis_side="left"), "basis_side"),
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(step_size=-0.1), "step_size"), (dict(scale=0.0), "scale"),
    (dict(norm_growth_limit=0.9), "norm_growth_limit"),
    (dict(seed=1.5), "seed"),
])
def test_construction_errors_name_the_argument(kwargs, arg):
  kwargs = {"rank": R, **kwargs}
  with pytest.raises(ValueError, match=arg):
    st.subtrack(**kwargs)


def test_bf16_params_give_bf16_updates():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  tx = _tx(R, 2)
  outs, state = _run(tx, 3, params)
  for u in jax.tree.leaves(outs[-1]):
    assert u.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(u)))
  assert state.basis["w"].dtype == jnp.float32


def test_subtrack_adamw_is_the_documented_chain():
  lr, wd = 1e-2, 0.1
  params = jax.tree.map(lambda p: p + 1.0, PARAMS)
  tx = st.subtrack_adamw(lr, R, 2, weight_decay=wd)
  manual = optax.chain(_tx(R, 2), optax.add_decayed_weights(wd),
                       optax.scale_by_learning_rate(lr))
  a, _ = _run(tx, 3, params)
  b, _ = _run(manual, 3, params)
  chex.assert_trees_all_close(a[-1], b[-1], rtol=1e-6)
  direction, _ = _run(_tx(R, 2), 1, params)
  np.testing.assert_allclose(
      a[0]["w"], -lr * (direction[0]["w"] + wd * params["w"]), rtol=1e-5)


def test_inside_chain_masked_and_partition():
  params = {"w": jnp.ones((12, 20)), "b": jnp.ones((20,))}
  masked = optax.masked(st.subtrack(R, 2), {"w": True, "b": False})
  state = masked.init(params)
  u, state = jax.jit(masked.update)(_grads(0, params), state, params)
  np.testing.assert_array_equal(u["b"], _grads(0, params)["b"])
  assert u["w"].shape == (12, 20)

  part = optax.partition({"low": st.subtrack(R, 2), "dense": optax.adam(1.0)},
                         {"w": "low", "b": "dense"})
  state = part.init(params)
  u, state = jax.jit(part.update)(_grads(0, params), state, params)
  tx = _tx(R, 2)
  ref, _ = tx.update({"w": _grads(0, params)["w"]}, tx.init({"w": params["w"]}))
  np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_with_static_shape_arguments():
  inj = optax.inject_hyperparams(st.subtrack, static_args=st.STATIC_ARGS)
  defaults = inspect.signature(st.subtrack).parameters
  tx = inj(rank=R, update_interval=2, scale=defaults["scale"].default,
           step_size=defaults["step_size"].default)
  plain = _tx(R, 2)
  a, state = _run(tx, 3)
  b, _ = _run(plain, 3)
  chex.assert_trees_all_close(a[-1], b[-1], rtol=1e-5, atol=1e-6)
  # A hyperparameter changed in the state changes the update.
  state.hyperparams["scale"] = jnp.asarray(0.5)
  u, _ = jax.jit(tx.update)(_grads(9), state, PARAMS)
  assert np.all(np.isfinite(u["w"]))


def test_multisteps_runs_inner_update_per_accumulated_step():
  inner = st.subtrack(R, update_interval=2)
  ms = optax.MultiSteps(inner, every_k_schedule=2)
  state = ms.init(PARAMS)
  update = jax.jit(ms.update)
  for t in range(4):
    _, state = update(_grads(t), state, PARAMS)
  # Two accumulated steps were applied, so the inner count is 2.
  assert int(state.inner_opt_state.count) == 2


def test_library_imports_with_its_declared_dependencies_only():
  # pyproject.toml declares jax, optax and numpy; test-only packages (chex,
  # hypothesis, flax ...) must not be needed to import and run the library,
  # as in the README's `pip install -e '.[examples]'`.
  from tests import _monitor  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = (
      "import sys\n"
      "for name in ('chex', 'hypothesis', 'flax', 'pytest'):\n"
      "  sys.modules[name] = None  # importing it raises ImportError\n"
      "import jax.numpy as jnp, subtrack_optax as st\n"
      "tx = st.subtrack_adamw(1e-3, 2)\n"
      "p = {'w': jnp.ones((4, 6))}\n"
      "tx.update(p, tx.init(p), p)\n"
      "print('ok')\n")
  out = _monitor.run([sys.executable, "-c", code])
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_argument_dimension_numbers_are_the_default_rule():
  """``SubTrackDimensionNumbers()`` = the last two axes (issue 13, item 6):
  a scanned ``(L, m, n)`` leaf is L matrices, not silently dense."""
  spec = st.SubTrackDimensionNumbers()
  assert (spec.reduction_axis, spec.output_axis) == (-2, -1)
  params = {"scan": jnp.zeros((4, 48, 64))}
  state = st.subtrack(R, dimension_numbers=spec).init(params)
  assert state.basis["scan"].shape == (4, 48, R)
  default = st.subtrack(R).init(params)
  assert jax.tree.structure(state) == jax.tree.structure(default)


def test_update_accepts_extra_args_through_chain():
  """optax's chain forwards extra arguments (issue 13, item 1)."""
  tx = optax.chain(st.subtrack(rank=1), optax.scale(-1e-3))
  state = tx.init(PARAMS)
  u, _ = tx.update(_grads(0), state, PARAMS, value=jnp.float32(1.0))
  assert jax.tree.structure(u) == jax.tree.structure(PARAMS)


def test_public_signatures_have_real_annotations():
  """No string annotations: optax sees that the lr may be a schedule."""
  import inspect  # pylint: disable=g-import-not-at-top
  for fn in (st.subtrack, st.subtrack_adamw, st.partition_specs,
             st.subspace_diagnostics, st.grassmann_step):
    for name, p in inspect.signature(fn).parameters.items():
      assert not isinstance(p.annotation, str), (fn.__name__, name)
  lr = inspect.signature(st.subtrack_adamw).parameters["learning_rate"]
  assert lr.annotation is optax.ScalarOrSchedule


def test_inject_hyperparams_on_subtrack_adamw():
  """The lr and the floats are injectable (issue 13, item 2)."""
  tx = optax.inject_hyperparams(st.subtrack_adamw,
                                static_args=st.STATIC_ARGS)(
                                    learning_rate=1e-3, rank=R,
                                    weight_decay=0.0)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  u1, _ = update(_grads(0), state, PARAMS)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-3)
  u2, _ = update(_grads(0), state, PARAMS)
  np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-5)
  with pytest.raises(ValueError, match="rank.*static_args"):
    optax.inject_hyperparams(st.subtrack_adamw)(learning_rate=1e-3,
                                                rank=R).init(PARAMS)


def test_update_interval_and_seed_are_injectable():
  """Only ``rank`` must be static among the numbers (optax's contrib tests
  keep only ``rank``-like arguments static); an injected interval and
  seed give the plain transform's updates, and a changed interval in the
  state moves the refreshes."""
  kw = dict(subspace_update="random", stagger=True)
  tx = optax.inject_hyperparams(st.subtrack, static_args=("rank",))(
      rank=R, update_interval=2, seed=3, **kw)
  assert set(tx.init(PARAMS).hyperparams) >= {"update_interval", "seed"}
  a, state = _run(tx, 5)
  b, _ = _run(st.subtrack(R, 2, seed=3, **kw), 5)
  # (Injected floats are float32 arrays instead of Python constants:
  # rounding differs at the 1e-5 level.)
  chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-5)
  # "scan" (phase 0) refreshes at step 5 with interval 5, not with 2.
  def moved(interval):
    hyper = dict(state.hyperparams, update_interval=jnp.asarray(interval))
    _, after = jax.jit(tx.update)(_grads(5), state._replace(
        hyperparams=hyper), PARAMS)
    return not np.allclose(after.inner_state.basis["scan"],
                           state.inner_state.basis["scan"])
  assert moved(5) and not moved(2)
  with pytest.raises(TypeError, match="update_interval"):
    st.subtrack(R, jnp.asarray(2.0))


def test_optax_map_params():
  """``optax.tree.map_params`` (init on a leafless placeholder) works, and
  the mapped state is a working state."""
  tx = st.subtrack_adamw(1e-2, R)
  state = tx.init(PARAMS)
  mapped = optax.tree.map_params(tx, lambda v: v + 1.0, state)
  np.testing.assert_allclose(mapped[0].mu["w"], state[0].mu["w"] + 1.0)
  _, new = jax.jit(tx.update)(_grads(0), mapped, PARAMS)
  assert new[0].plans == state[0].plans and new[0].plans is not None
