r"""Compare SubTrack++ against AdamW and GaLore on the LLaMA example.

Trains ``examples/pretrain_llama.py`` (config ``small`` by default) for the
same number of steps with every method, over several seeds, and writes a
markdown table and a JSON file to ``benchmarks/results/``::

  python benchmarks/compare.py                  # the full default run
  python benchmarks/compare.py --quick          # a smoke run (tiny, 2 seeds)
  python benchmarks/compare.py --only adamw subtrack++

Sections:

* **main**: adamw; optax GaLore (``optax.contrib.galore``); ours with
  ``svd`` (GaLore), ``frozen`` and ``grassmann`` without extras (transport and
  recovery off = SubTrack-Grad); grassmann + transport; grassmann + recovery;
  full SubTrack++ (library defaults).
* **A/B** (SPEC section 5, each against full SubTrack++): the reference
  code's second-moment transport (``(1-b2) |...|``), a bias-consistent
  transport (the LDAdam form applied to bias-corrected moments), the
  reference's recovery residual (``G - scale S S^T G``), the paper's raw
  tracking step (``normalize_tracking=False``, step size 10 as in the
  reference scripts) and ``basis_side="large"``.
* **sweep**: the geodesic step size and the learning rate of SubTrack++, and
  AdamW's learning rate (is the baseline handicapped by the shared one?).
* **follow-up**: the step-size sweep again with the bias-consistent
  transport, and that transport combined with the reference's recovery
  residual.

The "Δ vs subtrack++" column is the mean and std over the seeds both runs
share of the paired difference in eval loss (same seed = same initialization
and data order).

Each method runs in its own subprocess (all its seeds in one process, so
the training step is compiled once); *peak RSS* is that process's
``ru_maxrss`` from ``os.wait4`` (host memory: the JAX runtime, compiled code,
data and all arrays; on CPU the arrays live in host memory). *Opt state* is
the exact size of the optimizer state (``tx.init``). *tokens/s* excludes
the first (compiling) step of every run.

The A/B variants are public options of ``subtrack`` (``transport_moments``
and ``recovery_scaling`` take named forms), passed as flags of the example.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# (section, name, flags of pretrain_llama.py, variant)
MAIN = [
    ("main", "adamw", ["--optimizer", "adamw"], None),
    ("main", "optax galore", ["--optimizer", "galore"], None),
    ("main", "svd (GaLore)", ["--subspace-update", "svd", "--no-transport",
                              "--no-recovery"], None),
    ("main", "frozen", ["--subspace-update", "frozen", "--no-transport",
                        "--no-recovery"], None),
    ("main", "grassmann (SubTrack-Grad)", ["--no-transport", "--no-recovery"],
     None),
    ("main", "grassmann + transport", ["--no-recovery"], None),
    ("main", "grassmann + recovery", ["--no-transport"], None),
    ("main", "subtrack++", [], None),
]
AB = [
    ("A/B", "transport: reference (1-b2)|.|", ["--transport", "reference"],
     None),
    ("A/B", "transport: bias-consistent", ["--transport", "debiased"], None),
    ("A/B", "recovery: reference G - scale SS^T G",
     ["--recovery", "reference"], None),
    ("A/B", "raw step (normalize_tracking=False, 10)",
     ["--raw-step", "--step-size", "10"], None),
    ("A/B", "basis_side=large", ["--basis-side", "large"], None),
]
# With the bias-consistent transport (which removes the instability that
# the library's current transport shows at early subspace updates).
DEBIASED = ["--transport", "debiased"]
FOLLOWUP = [
    ("follow-up", f"bias-consistent, step_size={s}",
     ["--step-size", str(s)] + DEBIASED, None) for s in (0.1, 0.25, 1.0)
] + [
    ("follow-up", f"bias-consistent, lr={lr}", ["--lr", str(lr)] + DEBIASED,
     None) for lr in (1e-3, 1e-2)
] + [
    ("follow-up", "bias-consistent + reference recovery",
     DEBIASED + ["--recovery", "reference"], None),
    # Do the reference-form gains survive a tuned learning rate?
    ("follow-up", "bias-consistent + reference recovery, lr=0.01",
     ["--lr", "0.01"] + DEBIASED + ["--recovery", "reference"], None),
    ("follow-up", "reference transport, lr=0.01",
     ["--lr", "0.01", "--transport", "reference"], None),
]
SWEEP = [
    ("sweep", f"step_size={s}", ["--step-size", str(s)], None)
    for s in (0.1, 0.25, 1.0, 2.0)
] + [
    ("sweep", f"adamw lr={lr}", ["--optimizer", "adamw", "--lr", str(lr)],
     None) for lr in (1e-3, 1e-2)
] + [
    ("sweep", f"subtrack++ lr={lr}", ["--lr", str(lr)], None)
    for lr in (1e-3, 1e-2)
]


# --------------------------------------------------------------------------
# Worker side.


def worker(spec_json: str) -> None:
  """Runs every seed of one method in this process; appends JSON results."""
  spec = json.loads(spec_json)
  sys.path.insert(0, EXAMPLES)
  import pretrain_llama  # pylint: disable=g-import-not-at-top
  for seed in spec["seeds"]:
    argv = spec["argv"] + ["--seed", str(seed), "--no-progress", "--no-plot"]
    t0 = time.perf_counter()
    out = pretrain_llama.main(argv)
    losses = out["losses"]
    every = max(1, len(losses) // 100)
    rec = {"name": spec["name"], "seed": seed,
           "eval_loss": out["eval_loss"], "tokens_per_s": out["tokens_per_s"],
           "opt_state_bytes": out["opt_state_bytes"],
           "param_bytes": out["param_bytes"],
           "captured_energy": (sum(out["captured_energy"].values())
                               / len(out["captured_energy"])
                               if out["captured_energy"] else None),
           "wall_s": time.perf_counter() - t0,
           "loss_steps": list(range(every, len(losses) + 1, every)),
           "losses": losses[every - 1::every]}
    with open(spec["result_file"], "a") as f:
      f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------
# Parent side.


def run_method(section, name, flags, variant, base_argv, seeds, tmp_file):
  """Runs one method's seeds in a subprocess; returns (records, rusage)."""
  spec = {"name": name, "argv": base_argv + flags, "variant": variant,
          "seeds": list(seeds), "result_file": tmp_file}
  if os.path.exists(tmp_file):
    os.remove(tmp_file)
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--_worker",
       json.dumps(spec)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  output = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  records = []
  if os.path.exists(tmp_file):
    with open(tmp_file) as f:
      records = [json.loads(l) for l in f]
  if proc.returncode != 0 or len(records) != len(seeds):
    print(output[-3000:], file=sys.stderr)
    raise RuntimeError(f"{name} failed (exit {proc.returncode})")
  peak_mb = usage.ru_maxrss / 1024.0  # Linux: kilobytes
  return {"section": section, "name": name, "flags": flags,
          "variant": variant, "runs": records, "peak_rss_mb": peak_mb,
          "process_wall_s": wall, "load_avg_start": load}


def _mean_std(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return float("nan"), float("nan")
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(result):
  runs = result["runs"]
  loss_m, loss_s = _mean_std([r["eval_loss"] for r in runs])
  tps_m, _ = _mean_std([r["tokens_per_s"] for r in runs])
  energy, _ = _mean_std([r["captured_energy"] for r in runs])
  return {"eval_loss_mean": loss_m, "eval_loss_std": loss_s,
          "tokens_per_s": tps_m,
          "opt_state_mb": runs[0]["opt_state_bytes"] / 2**20,
          "peak_rss_mb": result["peak_rss_mb"], "captured_energy": energy,
          "n_seeds": len(runs)}


def paired_delta(result, ref):
  """Mean and std over shared seeds of (eval loss - reference eval loss)."""
  ref_by_seed = {x["seed"]: x["eval_loss"] for x in ref["runs"]}
  diffs = [x["eval_loss"] - ref_by_seed[x["seed"]] for x in result["runs"]
           if x["seed"] in ref_by_seed]
  return (*_mean_std(diffs), len(diffs))


def markdown(results, header, reference="subtrack++"):
  ref = next((r for r in results if r["name"] == reference), None)
  lines = header + [""]
  sections = []
  for r in results:
    if r["section"] not in sections:
      sections.append(r["section"])
  titles = {"main": "Methods", "A/B": "A/B of SPEC section 5 (vs subtrack++)",
            "sweep": "Sweeps (subtrack++ unless named)",
            "follow-up": "Follow-up: with the bias-consistent transport"}
  for sec in sections:
    lines += [f"### {titles.get(sec, sec)}", "",
              "| method | flags | eval loss (mean ± std) | Δ vs subtrack++ "
              "(same seeds) | tokens/s | opt state (MiB) | peak RSS (MiB) | "
              "captured energy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in (x for x in results if x["section"] == sec):
      s = summarize(r)
      flags = " ".join(r["flags"]) + (f" [{r['variant']}]" if r["variant"]
                                      else "")
      delta = ""
      if ref is not None and r is not ref:
        d_mean, d_std, n = paired_delta(r, ref)
        delta = f"{d_mean:+.4f} ± {d_std:.4f}" if n else ""
      energy = ("" if s["captured_energy"] != s["captured_energy"]
                else f"{s['captured_energy']:.3f}")
      lines.append(
          f"| {r['name'].replace('|', '&#124;')} | "
          f"`{(flags or '(defaults)').replace('|', '&#124;')}` | "
          f"{s['eval_loss_mean']:.4f} ± {s['eval_loss_std']:.4f} "
          f"(n={s['n_seeds']}) | {delta} | {s['tokens_per_s']:,.0f} | "
          f"{s['opt_state_mb']:.2f} | {s['peak_rss_mb']:.0f} | {energy} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="small")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps of every run (default: the config's)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--ab-seeds", type=int, nargs="+", default=[0, 1],
                 help="seeds of the A/B, sweep and follow-up runs")
  p.add_argument("--sections", nargs="+",
                 default=["main", "A/B", "sweep", "follow-up"])
  p.add_argument("--only", nargs="+", default=None,
                 help="run only these method names")
  p.add_argument("--quick", action="store_true",
                 help="tiny config, 20 steps, seeds 0 1: a smoke test")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--tag", default=None, help="output file suffix")
  p.add_argument("--resume", action="store_true",
                 help="keep the methods already in the output JSON (same "
                 "config, steps and seeds) and run only the missing ones")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker is not None:
    worker(args._worker)
    return

  if args.quick:
    args.config, args.steps, args.seeds = "tiny", args.steps or 20, [0, 1]
  ab_seeds = args.ab_seeds
  base = ["--config", args.config, "--eval-batches", "16"]
  if args.steps:
    base += ["--steps", str(args.steps)]
  methods = [m for m in MAIN + AB + SWEEP + FOLLOWUP
             if m[0] in args.sections]
  if args.only:
    methods = [m for m in methods if m[1] in args.only]
  tag = args.tag or args.config + ("-quick" if args.quick else "")
  os.makedirs(args.out, exist_ok=True)
  tmp = os.path.join(args.out, f".compare_{tag}.tmp.jsonl")
  command = "python benchmarks/compare.py " + " ".join(
      a if " " not in a else repr(a) for a in (argv or sys.argv[1:]))
  started = datetime.datetime.now(datetime.timezone.utc)
  load0 = os.getloadavg()
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, EXAMPLES)
  import _llama  # pylint: disable=g-import-not-at-top
  cfg = _llama.CONFIGS[args.config]
  steps = args.steps or cfg.steps
  json_path = os.path.join(args.out, f"compare_{tag}.json")
  machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
             "python": platform.python_version(), "jax": jax.__version__,
             "load_avg_start": load0[0]}
  done = {}
  if args.resume and os.path.exists(json_path):
    old = json.load(open(json_path))
    if old["config"] == args.config and old["steps"] == steps:
      for r in old["results"]:
        done[r["name"]] = r
      command, started = old["command"], datetime.datetime.fromisoformat(
          old["date"])
      machine = old["machine"]

  def save(results, total, complete):
    with open(json_path, "w") as f:
      json.dump({"command": command.strip(), "date": started.isoformat(),
                 "config": args.config, "steps": steps, "machine": machine,
                 "total_s": total, "complete": complete,
                 "results": [{**r, "summary": summarize(r)}
                             for r in results]}, f, indent=1)

  results = []
  t0 = time.perf_counter() - (
      json.load(open(json_path)).get("total_s", 0.0) if done else 0.0)
  for section, name, flags, variant in methods:
    seeds = args.seeds if section == "main" else ab_seeds
    prev = done.get(name)
    if prev is not None and [x["seed"] for x in prev["runs"]] == list(seeds):
      results.append({k: v for k, v in prev.items() if k != "summary"})
      continue
    r = run_method(section, name, flags, variant, base, seeds, tmp)
    results.append(r)
    save(results, time.perf_counter() - t0, complete=False)
    s = summarize(r)
    print(f"[{time.perf_counter() - t0:7.0f}s] {section:5s} {name:42s} "
          f"eval {s['eval_loss_mean']:.4f} ± {s['eval_loss_std']:.4f}  "
          f"{s['tokens_per_s']:8,.0f} tok/s  state {s['opt_state_mb']:.2f} "
          f"MiB  rss {s['peak_rss_mb']:.0f} MiB", flush=True)
  if os.path.exists(tmp):
    os.remove(tmp)
  total = time.perf_counter() - t0

  header = [
      f"## Comparison on `{args.config}` ({steps} steps, "
      f"{cfg.batch_size}x{cfg.seq_len} byte tokens per step)",
      "",
      f"- command: `{command.strip()}`",
      f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; total "
      f"{total / 60:.1f} min",
      f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"{platform.platform()}; Python {platform.python_version()}, jax "
      f"{machine['jax']}; load average {machine['load_avg_start']:.1f} at "
      "start, "
      f"{os.getloadavg()[0]:.1f} at end (the machine was shared: "
      "tokens/s are noisy)",
      f"- model: hidden {cfg.hidden}, intermediate {cfg.intermediate}, heads "
      f"{cfg.heads}, layers {cfg.layers}; rank {cfg.rank}, update interval "
      f"{cfg.update_interval}, lr {cfg.lr} (warmup 10%, cosine to 10%), "
      "clip 1.0, scale 0.25; data: the Python standard library (eval loss in "
      "nats per byte on the held-out files)",
      f"- seeds: {args.seeds} (A/B and sweeps: {ab_seeds}); peak RSS = "
      "ru_maxrss of the process that ran all seeds of a method",
  ]
  md = markdown(results, header)
  print("\n" + md)
  with open(os.path.join(args.out, f"compare_{tag}.md"), "w") as f:
    f.write(md + "\n")
  save(results, total, complete=True)


if __name__ == "__main__":
  main()
