r"""A comparison in a regime that means something: every method at its own
tuned learning rate (issue 14).

Protocol (stated in the output and checked):

* the model (``--config``, default ``small``) trains ``--steps`` (>= 1000)
  steps with a subspace update every ``--update-interval`` steps (>= 10
  updates) at rank ``hidden / 4`` (the config's, as in the paper);
* **sweep**: each method trains seed 0 on a learning-rate grid (powers of
  ``sqrt(10)``, four points to start); while the best point is at an edge of
  the grid, the grid is extended past that edge (up to ``--max-grid``
  points), so the reported optimum is interior or flagged as not;
* **final**: seeds 1 and 2 at the method's best learning rate (seed 0 is the
  sweep's run there): eval loss mean and std over 3 seeds, and the paired
  difference to SubTrack++ per seed (same seed = same initialization and
  data order);
* every run is its own process (its peak RSS is its own), ``--jobs`` (2)
  at a time, each then on one XLA:CPU thread: a free slot goes to the
  first method, in table order, with a run it can start (:func:`plan`);
* the eval loss is the mean over ``--eval-batches`` held-out batches; its
  standard error over the batches (*eval noise*) is printed next to the
  seed std.

Every run is one record (``method``, ``phase``, ``lr``, ``seed``,
``eval_loss``, ``eval_sem``, ``steps``, ``tokens_per_s``, ...) appended to
``benchmarks/results/compare.jsonl`` as it finishes; a rerun skips the runs
already there (so an interrupted run resumes). ``compare.json`` (records,
``grids``, per-method peak RSS, machine) and ``compare.md`` (the table and
the regime and target checks) are rewritten after every method.

Usage::

  python benchmarks/tuned_compare.py                 # the main table
  python benchmarks/tuned_compare.py --only subtrack++ adamw
  python benchmarks/tuned_compare.py --variants      # items 3-4: SubTrack++
                                                     # variants at its lr,
                                                     # and other scales at
                                                     # their own tuned lr
  python benchmarks/tuned_compare.py --quick         # smoke: tiny, 30 steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RESULTS = os.path.join(ROOT, "benchmarks", "results")

NO_EXTRAS = ["--no-transport", "--no-recovery"]
# (method, flags of examples/pretrain_llama.py)
METHODS = [  # the reference and the baselines first (a partial run has them)
    ("subtrack++", []),
    ("adamw", ["--optimizer", "adamw"]),
    ("optax galore", ["--optimizer", "galore"]),
    ("svd (GaLore)", ["--subspace-update", "svd"] + NO_EXTRAS),
    ("svd + recovery (Fira-like)", ["--subspace-update", "svd",
                                    "--no-transport"]),
    ("frozen", ["--subspace-update", "frozen"] + NO_EXTRAS),
    ("random (GoLore)", ["--subspace-update", "random"] + NO_EXTRAS),
    ("grassmann (SubTrack-Grad)", NO_EXTRAS),
    ("grassmann + transport", ["--no-recovery"]),
    ("grassmann + recovery", ["--no-transport"]),
]
REFERENCE = "subtrack++"
# The paper's ablation order: tracking -> + transport -> + recovery -> both.
ABLATION = ["grassmann (SubTrack-Grad)", "grassmann + transport",
            "grassmann + recovery", "subtrack++"]
# Design decisions (issue 14 items 3 and 4): variants of SubTrack++ trained
# at SubTrack++'s tuned learning rate on the same seeds (paired), phase "ab".
VARIANTS = [
    ("transport: debiased", ["--transport", "debiased"]),
    ("transport: reference (1-b2)", ["--transport", "reference"]),
    ("transport: reset V", ["--transport", "reset"]),
    ("basis_side: large", ["--basis-side", "large"]),
    ("step_size 0.5", ["--step-size", "0.5"]),   # the default until 12-04
    ("step_size 1.0", ["--step-size", "1.0"]),
    ("scale 0.5", ["--scale", "0.5"]),
    ("scale 0.125", ["--scale", "0.125"]),
]
# Joint (scale, lr) tuning (item 4): SubTrack++ with another scale, each at
# its own tuned lr (the whole sweep protocol), paired with the defaults.
TUNED_VARIANTS = [
    ("scale 0.125, own lr", ["--scale", "0.125"]),
    ("scale 0.5, own lr", ["--scale", "0.5"]),
]
START_GRID = (-6, -5, -4, -3)   # lr = 10 ** (k / 2): 1e-3 ... 3.2e-2
SEEDS = (0, 1, 2)


def lr_of(k: int) -> float:
  return float(f"{10 ** (k / 2):.3g}")


# --------------------------------------------------------------------------
# Worker: one method's sweep and final runs, in one process.


def _train(spec: dict, lr: float, seed: int) -> dict:
  import pretrain_llama  # pylint: disable=g-import-not-at-top
  argv = spec["base"] + spec["flags"] + [
      "--lr", repr(lr), "--seed", str(seed), "--no-progress", "--no-plot"]
  t0 = time.perf_counter()
  out = pretrain_llama.main(argv)
  losses = out["losses"]
  every = max(1, len(losses) // 50)
  return {"method": spec["method"], "lr": lr, "seed": seed,
          "eval_loss": out["eval_loss"], "eval_sem": out["eval_sem"],
          "eval_batch_losses": out["eval_batch_losses"],
          "steps": out["steps"], "tokens_per_s": out["tokens_per_s"],
          "opt_state_bytes": out["opt_state_bytes"],
          "wall_s": time.perf_counter() - t0,
          "train_losses": losses[every - 1::every]}


def _best_k(done: dict) -> int:
  return min(done, key=lambda k: done[k]["eval_loss"])


def plan(spec: dict, done: dict):
  """The runs the protocol needs next, given the method's runs so far.

  ``done`` maps ``(k, seed)`` to a record (runs in flight count as not
  done: they are asked for again, and the caller skips them). Returns a
  list of ``(phase, k, seed)``, or None when the method is finished:

  * a variant (``spec["fixed_k"]``): every seed at that lr;
  * the sweep: seed 0 on the grid (the start grid and every point run so
    far); once all are done, the grid grows past an edge optimum (up to
    ``max_grid`` points);
  * then the other seeds at the best lr.
  """
  seeds = spec["seeds"]
  if spec.get("fixed_k") is not None:
    todo = [("ab", spec["fixed_k"], s) for s in seeds
            if (spec["fixed_k"], s) not in done]
    return todo or None
  ks = sorted(set(spec["grid"]) | {k for k, s in done if s == 0})
  missing = [("sweep", k, 0) for k in ks if (k, 0) not in done]
  if missing:
    return missing
  best = _best_k({k: done[(k, 0)] for k in ks})
  if len(ks) < spec["max_grid"] and not min(ks) < best < max(ks):
    return [("sweep", best - 1 if best == min(ks) else best + 1, 0)]
  todo = [("final", best, s) for s in seeds[1:] if (best, s) not in done]
  return todo or None


def _record(spec: dict, phase: str, k: int, seed: int, rec: dict) -> dict:
  return {**rec, "phase": phase, "k": k, "config": spec["config"],
          "update_interval": spec["interval"]}


def _append(spec: dict, rec: dict) -> None:
  with open(spec["jsonl"], "a") as f:
    f.write(json.dumps(rec) + "\n")
  print(f"{rec['method']}: {rec['phase']} lr {rec['lr']:g} seed "
        f"{rec['seed']}: eval {rec['eval_loss']:.4f} ({rec['wall_s']:.0f} s)",
        flush=True)


def run_one(run_json: str) -> None:
  """A child process: one training run, its record (with the process's
  peak RSS) written to ``run["out"]``."""
  run = json.loads(run_json)
  sys.path.insert(0, EXAMPLES)
  rec = _train(run["spec"], run["lr"], run["seed"])
  rec["peak_rss_mib"] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024.0          # Linux: kilobytes
  with open(run["out"], "w") as f:
    json.dump(rec, f)


# --------------------------------------------------------------------------
# Parent: every method's runs, ``--jobs`` at a time, then the tables.


def drive(specs: list, jobs: int, start, wait, on_record) -> None:
  """Runs every method's protocol (:func:`plan`), ``jobs`` runs at a time.

  A free slot goes to the first method (in ``specs`` order) with a run it
  can start; ``start(spec, phase, k, seed)`` launches one and returns a
  handle, ``wait()`` blocks until a run finishes and returns ``(handle,
  record)``, and ``on_record(spec, record)`` keeps it.
  """
  done = [{(r["k"], r["seed"]): r for r in s["have"]} for s in specs]
  flying = [set() for _ in specs]
  running = {}
  while True:
    for i, spec in enumerate(specs):
      todo = [t for t in plan(spec, done[i]) or [] if t[1:] not in flying[i]]
      for phase, k, seed in todo[:max(0, jobs - len(running))]:
        running[start(spec, phase, k, seed)] = (i, phase, k, seed)
        flying[i].add((k, seed))
    if not running:
      return
    handle, rec = wait()
    i, phase, k, seed = running.pop(handle)
    flying[i].discard((k, seed))
    done[i][(k, seed)] = rec = _record(specs[i], phase, k, seed, rec)
    on_record(specs[i], rec)


# Runs at once share the cores: each runs XLA:CPU on one thread, pinned to a
# core of its own (:func:`processes`).
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# glibc serves an allocation above 32 MiB by a fresh mmap and unmaps it on
# free; XLA:CPU allocates the train step's temporaries (69 MiB at `small`)
# every step, so every step page-faulted them in again, 4 KiB at a time
# (17.6k faults and 37 ms of kernel time per 141 ms step, one core).
# Transparent huge pages for those mappings cut that to 36 faults per step.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def child_env(env: dict, jobs: int) -> dict:
  """The environment of a training run (:func:`processes` adds the shared
  compilation cache): one XLA:CPU thread when runs share the cores, and
  (Linux) glibc's transparent huge pages for its mmapped allocations
  (:data:`HUGE_PAGES`: the program is unchanged, the page faults are
  not)."""
  env = dict(env)
  env.setdefault("JAX_PLATFORMS", "cpu")
  if jobs > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()
  if sys.platform.startswith("linux") and "hugetlb" not in env.get(
      "GLIBC_TUNABLES", ""):
    env["GLIBC_TUNABLES"] = ":".join(
        t for t in (env.get("GLIBC_TUNABLES"), HUGE_PAGES) if t)
  return env


def core_slots(jobs: int) -> list:
  """One CPU per concurrent run when there are enough to pin them (a run
  that migrates between cores, or shares one with the other's threads, ran
  12% slower here), else none (runs are not pinned)."""
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else []
  return [{c} for c in cpus[:jobs]] if jobs > 1 and len(cpus) >= jobs else []


def processes(jobs: int, tmp: str) -> tuple:
  """``start`` and ``wait`` for :func:`drive`: a child process per run
  (:func:`run_one`; its peak RSS is the run's alone, its environment
  :func:`child_env`, pinned to a core of :func:`core_slots`), sharing a
  compilation cache in ``tmp``."""
  env = child_env(os.environ, jobs)
  # A run at an lr already run (another seed) reuses that run's compiled
  # programs (the seed is an argument of the program, not a constant).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tmp, "jax_cache"))
  free = core_slots(jobs)
  outs, cores = {}, {}

  def start(spec, phase, k, seed):
    del phase
    out = os.path.join(tmp, f"run{len(outs)}.json")
    run = {"spec": spec, "lr": lr_of(k), "seed": seed, "out": out}
    core = free.pop(0) if free else None
    pin = (lambda: os.sched_setaffinity(0, core)) if core else None
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                             "--_run", json.dumps(run)], env=env,
                            preexec_fn=pin)
    outs[proc.pid], cores[proc.pid] = out, core
    return proc.pid

  def wait():
    pid, status = os.waitpid(-1, 0)
    if cores.get(pid):
      free.append(cores[pid])
    if os.waitstatus_to_exitcode(status) != 0:
      raise RuntimeError(f"a training run (pid {pid}) failed")
    with open(outs[pid]) as f:
      return pid, json.load(f)

  return start, wait


def _records(path: str, args) -> list:
  """The records of this protocol (config, steps, interval) so far."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  key = (args.config, args.steps, args.update_interval)
  return [r for r in recs
          if (r["config"], r["steps"], r["update_interval"]) == key]



def _mean_std(xs):
  xs = list(xs)
  if not xs:
    return float("nan"), float("nan")
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _run_stats(runs: list) -> dict:
  runs = sorted(runs, key=lambda r: r["seed"])
  mean, std = _mean_std(r["eval_loss"] for r in runs)
  return {"runs": runs, "eval_loss_mean": mean, "eval_loss_std": std,
          "eval_sem": statistics.fmean(r["eval_sem"] for r in runs),
          "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
          "opt_state_mib": runs[0]["opt_state_bytes"] / 2**20,
          "seeds": [r["seed"] for r in runs]}


def summarize(records: list, method: str) -> dict:
  """Best lr, whether it is interior, the final seeds' statistics."""
  sweep = {r["k"]: r for r in records if r["method"] == method
           and r["seed"] == 0 and r["phase"] != "ab"}
  if not sweep:
    return {}
  best = _best_k(sweep)
  runs = [r for r in records if r["method"] == method and r["k"] == best]
  return {"grid": sorted(lr_of(k) for k in sweep), "best_lr": lr_of(best),
          "interior": min(sweep) < best < max(sweep), **_run_stats(runs)}


def summarize_variant(records: list, variant: str) -> dict:
  """A variant's runs (phase "ab", one lr) and their statistics."""
  runs = [r for r in records if r["method"] == variant and r["phase"] == "ab"]
  return {"lr": runs[0]["lr"], **_run_stats(runs)} if runs else {}


def paired(s: dict, ref: dict):
  """Mean, std and count of (eval loss - reference's) over shared seeds."""
  by_seed = {r["seed"]: r["eval_loss"] for r in ref.get("runs", [])}
  diffs = [r["eval_loss"] - by_seed[r["seed"]] for r in s.get("runs", [])
           if r["seed"] in by_seed]
  return (*_mean_std(diffs), len(diffs))


def _difference_sem(a, b) -> float:
  """Standard error over the shared eval batches of ``a - b`` per batch."""
  if not a or not b or len(a) != len(b) or len(a) < 2:
    return float("nan")
  d = [x - y for x, y in zip(a, b)]
  return statistics.stdev(d) / len(d) ** 0.5


def _mean_of_defined(xs) -> float:
  """Mean of the values that are not NaN (NaN if there are none)."""
  xs = [x for x in xs if x == x]
  return statistics.fmean(xs) if xs else float("nan")


def paired_eval_noise(s: dict, ref: dict) -> float:
  """The eval noise of a paired difference: the standard error over the
  (shared) eval batches of the per-batch loss differences, mean over
  seeds."""
  by_seed = {r["seed"]: r.get("eval_batch_losses") for r in ref.get("runs",
                                                                    [])}
  return _mean_of_defined(
      _difference_sem(r.get("eval_batch_losses"), by_seed.get(r["seed"]))
      for r in s.get("runs", []) if r["seed"] in by_seed)


def seed_difference_noise(s: dict) -> float:
  """The eval noise of a difference between two seeds' runs of one method
  (standard error over the shared batches, mean over seed pairs): how much
  of a seed-to-seed difference the finite eval set alone could make."""
  runs = s.get("runs", [])
  return _mean_of_defined(
      _difference_sem(a.get("eval_batch_losses"), b.get("eval_batch_losses"))
      for i, a in enumerate(runs) for b in runs[i + 1:])


def checks(summaries: dict, steps: int, interval: int, rank: int,
           hidden: int) -> list:
  """The regime checks and the issue's targets, as text lines."""
  ok = lambda b: "holds" if b else "DOES NOT HOLD"
  updates = 1 + (steps - 1) // interval
  lines = [f"- {steps} steps >= 1000: {ok(steps >= 1000)}",
           f"- {updates} subspace updates >= 10: {ok(updates >= 10)}",
           f"- rank {rank} = hidden / 4 = {hidden // 4}: "
           f"{ok(rank == hidden // 4)}"]
  for m, s in summaries.items():
    if not s:
      continue
    pair_noise, pair_std = seed_difference_noise(s), (
        s["eval_loss_std"] * 2 ** 0.5)
    lines.append(
        f"- {m}: optimum lr {s['best_lr']:g} interior to "
        f"{[f'{x:g}' for x in s['grid']]}: {ok(s['interior'])}; eval noise "
        f"{s['eval_sem']:.4f} < seed std {s['eval_loss_std']:.4f}: "
        f"{ok(s['eval_sem'] < s['eval_loss_std'])}; eval noise of a "
        f"seed-to-seed difference {pair_noise:.4f} < its std (sqrt 2 x "
        f"seed std) {pair_std:.4f}: {ok(pair_noise < pair_std)}")
  ref, adamw = summaries.get(REFERENCE), summaries.get("adamw")
  if ref and adamw:
    bound = adamw["eval_loss_mean"] * 1.01
    lines.append(f"- target: SubTrack++ {ref['eval_loss_mean']:.4f} <= tuned "
                 f"AdamW + 1% = {bound:.4f}: "
                 f"{ok(ref['eval_loss_mean'] <= bound)}")
  for g in ("optax galore", "svd (GaLore)"):
    s = summaries.get(g)
    if ref and s:
      margin = 2 * max(ref["eval_loss_std"], s["eval_loss_std"])
      lines.append(
          f"- target: SubTrack++ below {g} by more than 2 x the larger std "
          f"({s['eval_loss_mean'] - ref['eval_loss_mean']:+.4f} vs "
          f"{margin:.4f}): "
          f"{ok(s['eval_loss_mean'] - ref['eval_loss_mean'] > margin)}")
  return lines


def markdown(summaries, rss, header, check_lines, variants=None) -> str:
  ref = summaries.get(REFERENCE, {})
  lines = header + ["", "| method | lr grid (seed 0) | best lr | eval loss "
                    "(3 seeds) | eval noise | Δ vs subtrack++ (paired) | "
                    "tokens/s | opt state (MiB) | peak RSS (MiB) |",
                    "|---|---|---|---|---|---|---|---|---|"]
  for m, s in summaries.items():
    if not s:
      continue
    d_mean, d_std, n = paired(s, ref) if ref and m != REFERENCE else (
        0, 0, 0)
    noise = paired_eval_noise(s, ref) if n else float("nan")
    delta = f"{d_mean:+.4f} ± {d_std:.4f} (eval noise {noise:.4f})" if n else ""
    grid = ", ".join(f"{x:g}" for x in s["grid"])
    star = "" if s["interior"] else " (edge)"
    lines.append(
        f"| {m} | {grid} | {s['best_lr']:g}{star} | "
        f"{s['eval_loss_mean']:.4f} ± {s['eval_loss_std']:.4f} "
        f"(n={len(s['runs'])}) | {s['eval_sem']:.4f} | {delta} | "
        f"{s['tokens_per_s']:,.0f} | {s['opt_state_mib']:.2f} | "
        f"{rss.get(m, float('nan')):.0f} |")
  abl = [(m, summaries.get(m)) for m in ABLATION]
  if all(s for _, s in abl):
    lines += ["", "Ablation order (paired deltas, each against the one "
              "before):", ""]
    for (m0, s0), (m1, s1) in zip(abl, abl[1:]):
      d, sd, n = paired(s1, s0)
      lines.append(f"- {m0} -> {m1}: {d:+.4f} ± {sd:.4f} (n={n})")
  lines += variant_lines(variants or {}, ref)
  return "\n".join(lines + ["", "Checks:", ""] + check_lines) + "\n"


def variant_lines(variants: dict, ref: dict) -> list:
  """The design-decision table: each variant against SubTrack++ (defaults)
  at SubTrack++'s tuned lr, paired by seed."""
  rows = [(v, s) for v, s in variants.items() if s]
  if not rows or not ref:
    return []
  lines = ["", f"Design decisions (issue 14 items 3-4): variants of "
           f"SubTrack++ at its tuned lr {ref['best_lr']:g} (or, marked "
           "tuned, at their own tuned lr), same seeds (Δ = variant - "
           "defaults, paired):", "",
           "| variant | lr | eval loss | Δ vs defaults (paired) | opt state "
           "(MiB) | tokens/s |", "|---|---|---|---|---|---|",
           f"| defaults | {ref['best_lr']:g} | {ref['eval_loss_mean']:.4f} ± "
           f"{ref['eval_loss_std']:.4f} (n={len(ref['runs'])}) | | "
           f"{ref['opt_state_mib']:.2f} | {ref['tokens_per_s']:,.0f} |"]
  for v, s in rows:
    d, sd, n = paired(s, ref)
    noise = paired_eval_noise(s, ref)
    lr = (f"{s['best_lr']:g} (tuned{'' if s['interior'] else ', edge'})"
          if "best_lr" in s else f"{s['lr']:g}")
    lines.append(
        f"| {v} | {lr} | {s['eval_loss_mean']:.4f} ± "
        f"{s['eval_loss_std']:.4f} "
        f"(n={len(s['runs'])}) | {d:+.4f} ± {sd:.4f} (n={n}, eval noise "
        f"{noise:.4f}) | {s['opt_state_mib']:.2f} | "
        f"{s['tokens_per_s']:,.0f} |")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="small")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--update-interval", type=int, default=50)
  p.add_argument("--eval-batches", type=int, default=256)
  p.add_argument("--max-grid", type=int, default=7)
  p.add_argument("--only", nargs="+", default=None)
  p.add_argument("--variants", action="store_true",
                 help="the design-decision variants of SubTrack++ (at its "
                 "tuned lr, paired seeds) instead of the methods")
  p.add_argument("--quick", action="store_true",
                 help="tiny config, 30 steps, interval 3: a smoke run")
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--jobs", type=int, default=2,
                 help="training runs at once (each on one XLA thread when "
                 "more than one; default 2, the machine's cores)")
  p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._run is not None:
    run_one(args._run)
    return {}
  if args.jobs < 1:
    p.error(f"--jobs must be >= 1, got {args.jobs}")
  if args.quick:
    args.config, args.steps, args.update_interval = "tiny", 30, 3
    args.eval_batches, args.max_grid = 4, 5
  tag = "" if not args.quick else "_quick"
  os.makedirs(args.out, exist_ok=True)
  args.jsonl = os.path.join(args.out, f"compare{tag}.jsonl")
  sys.path.insert(0, EXAMPLES)
  import _configs  # pylint: disable=g-import-not-at-top
  cfg = _configs.CONFIGS[args.config]
  base = ["--config", args.config, "--steps", str(args.steps),
          "--update-interval", str(args.update_interval),
          "--eval-batches", str(args.eval_batches), "--no-diagnostics"]
  if args.variants:
    methods = [(v, f, True) for v, f in VARIANTS
               if not args.only or v in args.only] + [
                   (v, f, False) for v, f in TUNED_VARIANTS
                   if not args.only or v in args.only]
  else:
    methods = [(m, f, False) for m, f in METHODS
               if not args.only or m in args.only]
  started = datetime.datetime.now(datetime.timezone.utc)
  command = "python benchmarks/tuned_compare.py " + " ".join(
      argv if argv is not None else sys.argv[1:])
  json_path = os.path.join(args.out, f"compare{tag}.json")
  rss, t0 = {}, time.perf_counter()
  load = os.getloadavg()[0]
  if os.path.exists(json_path):   # a resumed run keeps earlier runs' RSS
    rss = json.load(open(json_path)).get("peak_rss_mib", {})
  have = _records(args.jsonl, args)
  specs = []
  for method, flags, is_variant in methods:
    fixed_k = None
    if is_variant:
      ref = [r for r in have if r["method"] == REFERENCE]
      if not ref:
        raise SystemExit(f"--variants needs {REFERENCE}'s sweep first")
      fixed_k = _best_k({r["k"]: r for r in ref if r["seed"] == 0})
    specs.append({"method": method, "flags": flags, "base": base,
                  "fixed_k": fixed_k, "grid": list(START_GRID),
                  "max_grid": args.max_grid, "seeds": list(SEEDS),
                  "jsonl": args.jsonl, "config": args.config,
                  "interval": args.update_interval,
                  "have": [r for r in have if r["method"] == method]})
  out = {}

  def write_tables():
    records = _records(args.jsonl, args)
    out["summaries"] = summaries = {m: summarize(records, m)
                                    for m, _ in METHODS}
    variants = {v: summarize_variant(records, v) for v, _ in VARIANTS}
    variants.update({v: summarize(records, v) for v, _ in TUNED_VARIANTS})
    header = [
        f"## Tuned comparison on `{args.config}` ({args.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} byte tokens, subspace update every "
        f"{args.update_interval}, rank {cfg.rank})", "",
        f"- command: `{command.strip()}`",
        f"- started {started.strftime('%Y-%m-%d %H:%M UTC')}; "
        f"{(time.perf_counter() - t0) / 60:.0f} min for the runs of "
        f"this invocation, {args.jobs} at a time"
        + (" (each on one XLA:CPU thread, pinned to a core)"
           if args.jobs > 1 else "")
        + f"; load average {load:.2f} at the start; environment of the "
        f"runs: `GLIBC_TUNABLES={HUGE_PAGES}` (Linux)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.platform()}, Python {platform.python_version()} "
        "(tokens/s: per run, with the other runs of the moment sharing the "
        "machine)",
        "- eval noise: standard error of the eval loss over its "
        f"{args.eval_batches} held-out batches (the same batches for every "
        "run); Δ: mean ± std over seeds of the paired difference, and the "
        "standard error over batches of the per-batch paired difference"]
    check_lines = checks(summaries, args.steps, args.update_interval,
                         cfg.rank, cfg.hidden)
    with open(os.path.join(args.out, f"compare{tag}.md"), "w") as f:
      f.write(markdown(summaries, rss, header, check_lines, variants))
    with open(json_path, "w") as f:
      json.dump({"command": command.strip(), "date": started.isoformat(),
                 "config": args.config, "steps": args.steps,
                 "update_interval": args.update_interval,
                 "rank": cfg.rank, "eval_batches": args.eval_batches,
                 "jobs": args.jobs, "load_average_at_start": load,
                 "minutes": (time.perf_counter() - t0) / 60,
                 "machine": {"platform": platform.platform(),
                             "cpus": os.cpu_count()},
                 "grids": {m: s["grid"] for m, s in {**summaries,
                                                     **variants}.items()
                           if s and "grid" in s},
                 "variants": dict(VARIANTS + TUNED_VARIANTS),
                 "peak_rss_mib": rss, "records": records}, f, indent=1)

  def on_record(spec, rec):
    _append(spec, rec)
    m = spec["method"]
    rss[m] = max(rss.get(m, 0.0), rec.get("peak_rss_mib", 0.0))
    write_tables()
    print(f"[{(time.perf_counter() - t0) / 60:5.1f} min]", flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    drive(specs, args.jobs, *processes(args.jobs, tmp), on_record)
  write_tables()
  summaries = out["summaries"]
  return {"summaries": summaries, "rss": rss}


if __name__ == "__main__":
  main()
