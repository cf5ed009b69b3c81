"""The protocol logic of benchmarks/tuned_compare.py (issue 14), with a
fake training run (no jax): the grid grows past an edge optimum until the
optimum is interior, the final seeds run at the best lr, an interrupted
run resumes from its records, and the checks say what holds."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                     "tuned_compare.py")


@pytest.fixture
def tc(monkeypatch):
  spec = importlib.util.spec_from_file_location("tuned_compare", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  trains = []

  def fake_train(spec, lr, seed):
    trains.append((spec["method"], lr, seed))
    # A valley in log10(lr) with its bottom at lr = 0.1 (k = -2: past the
    # start grid's top edge), and a per-seed offset.
    import math  # pylint: disable=g-import-not-at-top
    loss = 2.0 + (math.log10(lr) + 1.0) ** 2 + 0.01 * seed
    return {"method": spec["method"], "lr": lr, "seed": seed,
            "eval_loss": loss, "eval_sem": 0.001, "steps": 1000,
            "tokens_per_s": 1.0, "opt_state_bytes": 2**20, "wall_s": 0.0,
            "train_losses": []}

  monkeypatch.setattr(module, "_train", fake_train)
  module.calls, module.trains = [], trains
  return module


def _spec(tc, jsonl, have=()):
  return json.dumps({
      "method": "m", "flags": [], "base": [], "grid": list(tc.START_GRID),
      "max_grid": 7, "seeds": [0, 1, 2], "jsonl": str(jsonl),
      "config": "small", "interval": 50, "have": list(have)})


def _read(path):
  return [json.loads(l) for l in open(path)]


def _drive(tc, specs, jobs=1):
  """The parent's scheduler with a fake launcher: runs finish in the order
  they started; returns the most runs in flight at once."""
  queue, most = [], [0]

  def start(spec, phase, k, seed):
    queue.append((len(tc.calls), spec, k, seed))
    most[0] = max(most[0], len(queue))
    tc.calls.append(None)   # a handle
    return queue[-1][0]

  def wait():
    handle, spec, k, seed = queue.pop(0)
    return handle, tc._train(spec, tc.lr_of(k), seed)

  specs = [json.loads(s) for s in specs]
  tc.drive(specs, jobs, start, wait, lambda spec, rec: tc._append(spec, rec))
  return most[0]


def test_grid_extends_past_an_edge_then_final_seeds(tc, tmp_path):
  jsonl = tmp_path / "c.jsonl"
  _drive(tc, [_spec(tc, jsonl)])
  recs = _read(jsonl)
  sweep = sorted(r["k"] for r in recs if r["phase"] == "sweep")
  assert sweep == [-6, -5, -4, -3, -2, -1]        # grew until interior
  final = [(r["k"], r["seed"]) for r in recs if r["phase"] == "final"]
  assert final == [(-2, 1), (-2, 2)]
  s = tc.summarize(recs, "m")
  assert s["best_lr"] == 0.1 and s["interior"] and s["seeds"] == [0, 1, 2]
  assert s["eval_loss_mean"] == pytest.approx(2.01)


def test_resume_runs_only_what_is_missing(tc, tmp_path):
  jsonl = tmp_path / "c.jsonl"
  _drive(tc, [_spec(tc, jsonl)])
  first = len(tc.trains)
  recs = _read(jsonl)
  _drive(tc, [_spec(tc, jsonl, have=recs[:-1])])   # the last run was lost
  assert len(tc.trains) == first + 1 and tc.trains[-1][2] == 2


def test_grid_stops_at_its_cap_and_says_edge(tc, tmp_path):
  jsonl = tmp_path / "c.jsonl"
  spec = json.loads(_spec(tc, jsonl))
  spec["max_grid"] = 5
  _drive(tc, [json.dumps(spec)])
  s = tc.summarize(_read(jsonl), "m")
  assert len(s["grid"]) == 5 and not s["interior"]
  lines = tc.checks({"m": s}, 1000, 50, 32, 128)
  assert any("interior" in l and "DOES NOT HOLD" in l for l in lines)


def test_two_at_a_time_runs_the_same_protocol(tc, tmp_path):
  """Two methods, two runs in flight at a time: each method's runs are the
  ones it runs alone (the grid still grows only after its sweep is done),
  and never more than two are in flight."""
  alone = tmp_path / "alone.jsonl"
  _drive(tc, [_spec(tc, alone)])
  want = sorted((r["phase"], r["k"], r["seed"]) for r in _read(alone))
  both = tmp_path / "both.jsonl"
  other = json.loads(_spec(tc, both))
  other["method"] = "n"
  most = _drive(tc, [_spec(tc, both), json.dumps(other)], jobs=2)
  assert most == 2
  recs = _read(both)
  for m in ("m", "n"):
    got = sorted((r["phase"], r["k"], r["seed"]) for r in recs
                 if r["method"] == m)
    assert got == want, m
  # The grid extension waits for the whole sweep: no extension point
  # starts before every start-grid point of its method has a record.
  order = [(r["method"], r["k"]) for r in recs]
  for m in ("m", "n"):
    first_ext = min(i for i, (mm, k) in enumerate(order)
                    if mm == m and k not in tc.START_GRID)
    assert {k for mm, k in order[:first_ext] if mm == m} >= set(
        tc.START_GRID)


def test_plan_is_finished_when_nothing_is_left(tc):
  spec = json.loads(_spec(tc, "unused"))
  assert tc.plan(spec, {}) == [("sweep", k, 0) for k in tc.START_GRID]
  spec["fixed_k"] = -3
  done = {(-3, s): {"eval_loss": 1.0} for s in (0, 1, 2)}
  assert tc.plan(spec, done) is None


def test_regime_checks(tc):
  lines = tc.checks({}, 800, 100, 16, 128)
  assert "800 steps >= 1000: DOES NOT HOLD" in lines[0]
  assert "8 subspace updates >= 10: DOES NOT HOLD" in lines[1]
  assert "rank 16 = hidden / 4 = 32: DOES NOT HOLD" in lines[2]
  assert all("holds" in l for l in tc.checks({}, 1000, 50, 32, 128))


def test_variant_runs_every_seed_at_the_given_lr_only(tc, tmp_path):
  jsonl = tmp_path / "c.jsonl"
  _drive(tc, [_spec(tc, jsonl)])                  # the reference "m"
  spec = json.loads(_spec(tc, jsonl))
  spec.update(method="v", fixed_k=-2)
  _drive(tc, [json.dumps(spec)])
  recs = _read(jsonl)
  ab = [(r["method"], r["k"], r["seed"], r["phase"]) for r in recs
        if r["method"] == "v"]
  assert ab == [("v", -2, s, "ab") for s in (0, 1, 2)]
  v = tc.summarize_variant(recs, "v")
  assert v["lr"] == 0.1 and v["seeds"] == [0, 1, 2]
  assert tc.summarize(recs, "v") == {}            # not a tuned method
  lines = tc.variant_lines({"v": v}, tc.summarize(recs, "m"))
  assert any(l.startswith("| v | 0.1 | 2.0100") and "+0.0000" in l
             for l in lines)


def test_tuned_variant_row_shows_its_own_lr(tc, tmp_path):
  jsonl = tmp_path / "c.jsonl"
  other = json.loads(_spec(tc, jsonl))
  other["method"] = "w"
  _drive(tc, [_spec(tc, jsonl), json.dumps(other)], jobs=2)
  recs = _read(jsonl)
  ref, tuned = tc.summarize(recs, "m"), tc.summarize(recs, "w")
  (row,) = [l for l in tc.variant_lines({"w": tuned}, ref)
            if l.startswith("| w |")]
  assert row.startswith("| w | 0.1 (tuned) | 2.0100") and "+0.0000" in row


def test_eval_noise_of_differences(tc):
  base = [1.0, 2.0, 3.0, 4.0]
  runs = [{"seed": 0, "eval_batch_losses": base},
          {"seed": 1, "eval_batch_losses": [x + 0.1 for x in base]},
          {"seed": 2, "eval_batch_losses": [x + d for x, d in
                                            zip(base, (0, .2, 0, .2))]}]
  # Seeds 0-1 differ by a constant (no eval noise); 0-2 and 1-2 by
  # (0, .2, 0, .2) up to a shift: standard error .1155 / 2 = .0577.
  noise = tc.seed_difference_noise({"runs": runs})
  assert noise == pytest.approx((0 + 2 * 0.2 / 3 ** 0.5 / 2) / 3, rel=1e-3)
  ref = {"runs": [dict(runs[0], seed=s) for s in (0, 1, 2)]}
  # Against a reference equal to seed 0's losses, only seed 2 differs
  # by more than a constant.
  assert tc.paired_eval_noise({"runs": runs}, ref) == pytest.approx(
      0.2 / 3 ** 0.5 / 2 / 3, rel=1e-3)


def test_child_env_adds_huge_pages_once_and_one_thread_when_shared(tc):
  """Runs get glibc's huge pages for mmapped allocations (Linux) without
  losing tunables already set, and one XLA:CPU thread only when runs share
  the machine."""
  import sys  # pylint: disable=g-import-not-at-top
  one = tc.child_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, 1)
  two = tc.child_env({}, 2)
  assert "intra_op_parallelism_threads=1" not in one.get("XLA_FLAGS", "")
  assert "intra_op_parallelism_threads=1" in two["XLA_FLAGS"]
  if sys.platform.startswith("linux"):
    assert one["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:"
                                     + tc.HUGE_PAGES)
    assert tc.child_env(two, 2)["GLIBC_TUNABLES"] == tc.HUGE_PAGES


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                    reason="no CPU affinity on this platform")
def test_runs_in_flight_are_pinned_to_distinct_cores(tc, tmp_path,
                                                     monkeypatch):
  """With as many cores as jobs, each run in flight has a core of its own
  (its child process's affinity), and a finished run frees its core."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    pytest.skip("needs two cores")
  assert tc.core_slots(2) == [{cpus[0]}, {cpus[1]}]
  assert tc.core_slots(1) == []

  script = tmp_path / "child.py"
  script.write_text(
      "import json, os, sys\n"
      "run = json.loads(sys.argv[2])\n"
      "json.dump({'cores': sorted(os.sched_getaffinity(0))},"
      " open(run['out'], 'w'))\n")
  monkeypatch.setattr(tc.os.path, "abspath",
                      lambda p, real=os.path.abspath: str(script)
                      if p == tc.__file__ else real(p))
  start, wait = tc.processes(2, str(tmp_path))
  spec = {"method": "m"}
  first = {start(spec, "sweep", -4, 0), start(spec, "sweep", -3, 0)}
  got = [wait(), wait()]
  assert {h for h, _ in got} == first
  assert sorted(r["cores"] for _, r in got) == [[cpus[0]], [cpus[1]]]
  third = start(spec, "final", -4, 1)   # a freed core is reused
  handle, rec = wait()
  assert handle == third and len(rec["cores"]) == 1
