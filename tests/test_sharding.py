"""Sharded training: partition specs, explicit sharding, collectives.

The multi-device checks run tests/_sharding_worker.py once, in a subprocess
with 4 simulated CPU devices (the device count must be fixed before jax is
imported) under tests/_monitor.py, which fails a worker that stops making
progress (no output, no CPU use), so a collective that hangs fails fast.
The worker compiles each (mesh, mode) case once and reports measurements; the tests
below assert on them. ``partition_specs`` itself is pure and is tested here
in-process.
"""

import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import subtrack_optax as st
from tests import _monitor

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
CASES = [f"{m}:{mode}" for m in ("fsdp", "tp", "dp_tp")
         for mode in ("auto", "explicit")]
LAPACK = re.compile(r"lapack|eigh|syevd|geqrf|orgqr|gesdd|svd|potrf|"
                    r"cholesky|getrf|trsm|\bqr\b", re.IGNORECASE)
is_spec = lambda x: isinstance(x, P)


# ------------------------------------------------- partition_specs (pure) --

ATTN = st.SubTrackDimensionNumbers(0, (1, 2))


def _params():
  return {
      "w": jax.ShapeDtypeStruct((64, 128), jnp.float32),
      "tall": jax.ShapeDtypeStruct((128, 64), jnp.float32),
      "scan": jax.ShapeDtypeStruct((3, 64, 128), jnp.float32),
      "attn": jax.ShapeDtypeStruct((64, 4, 32), jnp.float32),
      "b": jax.ShapeDtypeStruct((128,), jnp.float32),
  }


SPECS = {"w": P("data", "model"), "tall": P("model", "data"),
         "scan": P(None, "data", "model"), "attn": P("data", "model", None),
         "b": P("model")}
DNUMS = {"w": st.SubTrackDimensionNumbers(0, 1),
         "tall": st.SubTrackDimensionNumbers(0, 1),
         "scan": st.SubTrackDimensionNumbers(1, 2), "attn": ATTN, "b": None}


def _structure(tree):
  return jax.tree.structure(tree, is_leaf=is_spec)


def test_partition_specs_rules_for_each_leaf_kind():
  tx = optax.chain(st.subtrack(rank=4, dimension_numbers=DNUMS),
                   optax.scale(-1.0))
  specs = st.partition_specs(tx, _params(), SPECS)
  s = specs[0]
  # Basis (batch, d, r): d takes the basis side's axes, r the other side's.
  # Moments (batch, r, D): r takes the basis side's axes, D the other's.
  assert s.basis["w"] == P("data", "model")          # basis on rows (64)
  assert s.mu["w"] == P("data", "model")
  assert s.basis["tall"] == P("data", "model")       # basis on columns (64)
  assert s.mu["tall"] == P("data", "model")          # D = 128 rows: 'model'
  assert s.basis["scan"] == P(None, "data", "model")
  assert s.nu["scan"] == P(None, "data", "model")
  assert s.recovery_norm["scan"] == P(None)
  # (embed, heads, head_dim): D = heads*head_dim merges ('model', None).
  assert s.basis["attn"] == P("data", "model")
  assert s.mu["attn"] == P("data", "model")
  assert s.recovery_norm["w"] == P()
  assert s.mu["b"] == P("model") and s.basis["b"] == optax.MaskedNode()
  assert s.count == P()
  state = jax.eval_shape(tx.init, _params())
  assert _structure(specs) == jax.tree.structure(state)


def test_partition_specs_basis_side_large_swaps_axes():
  tx = st.subtrack(rank=4, basis_side="large", dimension_numbers=DNUMS)
  s = st.partition_specs(tx, _params(), SPECS)
  # w (64, 128): basis on the 128 columns ('model'), moments (r, 64 rows).
  assert s.basis["w"] == P("model", "data")
  assert s.mu["w"] == P("model", "data")


def test_partition_specs_merges_tuple_axes():
  params = {"k": jax.ShapeDtypeStruct((8, 4, 32), jnp.float32)}
  tx = st.subtrack(rank=2, dimension_numbers={"k": ATTN})
  s = st.partition_specs(tx, params, {"k": P(None, "data", "model")})
  # Basis on the 8-row reduction side; D = 4 * 32 merges ('data', 'model').
  assert s.mu["k"] == P(None, ("data", "model"))
  assert s.basis["k"] == P(None, ("data", "model"))


def test_partition_specs_divisibility_fallback():
  params = {"w": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
  tx = st.subtrack(rank=6)
  mesh = AbstractMesh((2, 4), ("data", "model"))
  s = st.partition_specs(tx, params, {"w": P("data", "model")}, mesh=mesh)
  # r = 6 divides by data=2 but not by model=4: r is replicated on 'model'.
  assert s.basis["w"] == P("data", None)
  assert s.mu["w"] == P("data", "model")
  s = st.partition_specs(tx, params, {"w": P(("data", "model"), None)},
                         mesh=mesh)
  # d = 64 takes ('data', 'model'); r = 6 on nothing: moments' r keeps 'data'.
  assert s.basis["w"] == P(("data", "model"), None)
  assert s.mu["w"] == P("data", None)
  # Without a mesh the sizes are unknown and every axis is kept.
  s = st.partition_specs(tx, params, {"w": P("data", "model")})
  assert s.basis["w"] == P("data", "model")


@pytest.mark.parametrize("kind", ["masked", "partition", "inject", "multi",
                                  "adamw"])
def test_partition_specs_structure_in_optax_wrappers(kind):
  params = _params()
  labels = {k: ("sub" if k != "b" else "adam") for k in params}
  sub = lambda: st.subtrack(rank=4, dimension_numbers=DNUMS)
  tx = {
      "masked": lambda: optax.chain(
          optax.masked(sub(), {k: k != "b" for k in params}),
          optax.masked(optax.adam(1e-3), {k: k == "b" for k in params})),
      "partition": lambda: optax.partition(
          {"sub": sub(), "adam": optax.adam(1e-3)}, labels),
      "inject": lambda: optax.chain(
          optax.inject_hyperparams(st.subtrack, static_args=st.STATIC_ARGS)(
              rank=4, dimension_numbers=DNUMS, step_size=0.3),
          optax.scale(-1e-3)),
      "multi": lambda: optax.MultiSteps(
          optax.chain(sub(), optax.trace(0.9)), every_k_schedule=2),
      "adamw": lambda: st.subtrack_adamw(1e-3, rank=4,
                                         dimension_numbers=DNUMS),
  }[kind]()
  specs = st.partition_specs(tx, params, SPECS)
  state = jax.eval_shape(tx.init, params)
  assert _structure(specs) == jax.tree.structure(state)
  flat = jax.tree.leaves(specs, is_leaf=is_spec)
  leaves = jax.tree.leaves(state)
  for spec, leaf in zip(flat, leaves):
    assert len(spec) <= leaf.ndim
    if leaf.ndim == 0:
      assert spec == P()
  # Every SubTrack basis follows the rule; params-shaped state of other
  # transforms (trace, MultiSteps' accumulator, adam) gets the param's spec.
  found = [n for n in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, st.SubTrackState))
           if isinstance(n, st.SubTrackState)]
  assert found
  for node in found:
    assert node.basis["scan"] == P(None, "data", "model")
  if kind == "multi":
    assert specs.acc_grads == SPECS
    assert specs.inner_opt_state[1].trace == SPECS
  if kind == "masked":
    assert specs[1].inner_state[0].mu["b"] == P("model")


def test_partition_specs_rejects_mismatched_specs():
  tx = st.subtrack(rank=4)
  with pytest.raises(ValueError, match="param_specs"):
    st.partition_specs(tx, _params(), {"w": P("data")})


def test_partition_specs_two_subtracks_keep_their_own_plans():
  params = {"a": jax.ShapeDtypeStruct((64, 128), jnp.float32),
            "c": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
  tx = optax.partition(
      {"small": st.subtrack(rank=4),
       "large": st.subtrack(rank=8, basis_side="large")},
      {"a": "small", "c": "large"})
  specs = st.partition_specs(tx, params, {"a": P("data", "model"),
                                          "c": P("data", "model")})
  state = jax.eval_shape(tx.init, params)
  assert _structure(specs) == jax.tree.structure(state)
  small = specs.inner_states["small"].inner_state
  large = specs.inner_states["large"].inner_state
  assert small.basis["a"] == P("data", "model")
  assert large.basis["c"] == P("model", "data")
  assert state.inner_states["large"].inner_state.basis["c"].shape == (128, 8)


# ------------------------------------------- multi-device (subprocess) --


@pytest.fixture(scope="module")
def report():
  return _monitor.worker_report(WORKER)


@pytest.mark.parametrize("case", CASES)
def test_state_layout_is_partition_specs(report, case):
  r = report["cases"][case]
  assert r["structure_equal"]
  assert r["init_spec_mismatches"] == []
  assert r["state_spec_after_update"] == []


@pytest.mark.parametrize("case", CASES)
def test_sharded_updates_match_single_device(report, case):
  errs = report["cases"][case]["rel_err"]
  assert len(errs) == 5  # steps 0..4: subspace init, refreshes at 2 and 4
  bad = {(t, k): e for t, step in enumerate(errs) for k, e in step.items()
         if not e <= 1e-4}
  assert not bad, bad


@pytest.mark.parametrize("case", CASES)
def test_state_bytes_per_device(report, case):
  r = report["cases"][case]
  for total, per_device in (r["state_bytes"], r["subtrack_state_bytes"]):
    assert per_device <= 1.2 * total / r["devices"], (total, per_device)


@pytest.mark.parametrize("case", CASES)
def test_no_collective_of_matrix_size(report, case):
  r = report["cases"][case]
  limit = report["matrix_elems"] / 2
  big = [c for c in r["collectives"] if c[1] >= limit]
  assert not big, big
  assert r["collectives"], "expected r-sized reductions in a sharded update"


def test_collective_detector_sees_a_full_gather(report):
  limit = report["matrix_elems"] / 2
  sizes = [c[1] for c in report["controls"]["gather_collectives"]]
  assert sizes and max(sizes) >= limit


@pytest.mark.parametrize("case", CASES)
def test_compiled_update_has_no_lapack_call(report, case):
  calls = report["cases"][case]["custom_calls"]
  assert not [c for c in calls if LAPACK.search(c)], calls


def test_single_device_update_has_no_lapack_call(report):
  calls = report["single_device_custom_calls"]
  assert not [c for c in calls if LAPACK.search(c)], calls
  # Control: the pattern does catch the CPU eigh custom call.
  assert [c for c in report["controls"]["eigh_custom_calls"]
          if LAPACK.search(c)]


def test_explicit_mode_traces_for_every_option(report):
  bad = {k: v for k, v in report["explicit_variants"].items() if v != "ok"}
  assert not bad, bad


def test_explicit_mode_gathers_one_item_at_a_time(report):
  """Under explicit sharding each matrix's stored ``r``-axis shards are
  gathered when the sweep reaches it, not every leaf's before the sweeps:
  the update's temporaries grow with the number of leaves by far less than
  one gathered basis per leaf (gathering all first kept the whole state
  gathered: 2.4 GiB of temporaries in the 1B update on 16 TPU chips,
  docs/sharding.md)."""
  temps = {int(k): v for k, v in report["explicit_temps"]["temps"].items()}
  (n0, t0), (n1, t1) = sorted(temps.items())
  per_leaf = (t1 - t0) / (n1 - n0)
  assert per_leaf < 0.25 * report["explicit_temps"]["gathered_basis_bytes"], (
      temps)


# ------------------------------------------------- examples (slow) --

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run_example(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = _monitor.run([sys.executable, *args], env=env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_nnx_example_matches_one_device(mode):
  out = _run_example(str(EXAMPLES / "sharded_nnx.py"), "--mode", mode,
                     "--steps", "6")
  diff = float(re.search(r"max relative difference to one device (\S+)",
                         out).group(1))
  assert diff <= 1e-4, out


@pytest.mark.slow
def test_linen_pjit_example_trains():
  out = _run_example(str(EXAMPLES / "sharded_linen_pjit.py"), "--steps", "6")
  first, last = map(float, re.search(r"losses (\S+) -> (\S+)", out).groups())
  assert last < first, out
