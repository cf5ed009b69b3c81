"""Plumbing of benchmarks/step_time.py on one minuscule shape set.

No timing is asserted (speed targets live in the benchmark's printed
ratios); this checks that every compared optimizer compiles and runs on the
benchmark's trees, that the regular/update steps are selected through the
state's count, that the state-byte accounting matches the spec's formula,
and that the JSON/markdown reports are written.
"""

import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                     "step_time.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("step_time", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("step_time", module)  # dataclasses need the module
  spec.loader.exec_module(module)
  return module


def test_set_count_reaches_every_chained_count(bench):
  tx = bench.make_optimizer("galore", bench.ModelShape("t", 8, 12, 1, 1, 2),
                            4)
  state = tx.init({"w": jnp.zeros((8, 12))})
  counts = []
  jax.tree_util.tree_map_with_path(
      lambda p, x: counts.append(int(x))
      if getattr(p[-1], "name", None) == "count" else None,
      bench.set_count(state, 7))
  assert counts and all(c == 7 for c in counts)


def test_tiny_run_writes_consistent_report(bench, tmp_path):
  model = bench.ModelShape("tiny", hidden=16, intermediate=24, heads=2,
                           layers=2, rank=4)
  args = bench.parse_args([
      "--quick", "--repeats", "2", "--update-repeats", "1", "--interval", "4",
      "--methods", "floor,adamw,galore,grassmann,random/norec",
      "--out", str(tmp_path)])
  res = bench.run_size(model, args)
  rows = res["rows"]
  assert set(rows) == {"floor", "adamw", "galore", "grassmann",
                       "random/norec"}
  for name, row in rows.items():
    for key in ("regular_ms", "update_ms", "amortized_ms"):
      assert math.isfinite(row[key]) and row[key] > 0, (name, key)
  # The spec's formula: basis d*r + moments 2*r*D + one float per matrix,
  # 2*size per dense leaf, one int32 count -- for the measured blocks and
  # for the whole model (embeddings dense).
  for name in ("grassmann", "random/norec"):
    assert res["ratios"][name]["state_bytes_equal_spec"], name
  h, i, r = 16, 24, 4
  per_block = 4 * (h * r + 2 * r * h) + 3 * (h * r + 2 * r * i) + 7 + 4 * h
  assert res["spec_state_bytes"]["blocks"] == 4 * (1 + per_block)
  # Low-rank state is smaller than Adam's.
  assert rows["grassmann"]["state_bytes"] < rows["adamw"]["state_bytes"]
  md = bench.markdown({"sizes": [res]}, bench.machine(), "cmd")
  assert "| grassmann |" in md and "regular / floor" in md
  json.dumps(res)  # serializable


def test_orthonormal_drift_script_runs_both_ways():
  spec = importlib.util.spec_from_file_location(
      "orthonormal_drift", os.path.join(os.path.dirname(_PATH),
                                        "orthonormal_drift.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from subtrack_optax import _linalg
  original = _linalg.reorthonormalize_if_needed
  res = module.main(["--d", "12", "--big-d", "16", "--rank", "3", "--steps",
                     "20"])
  assert _linalg.reorthonormalize_if_needed is original  # restored
  assert set(res) == {"with correction", "no correction"}
  for drifts in res.values():
    assert list(drifts) == [20]
    assert 0.0 <= drifts[20] < 1e-4
