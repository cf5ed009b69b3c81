"""Whole-model cost of the optimizer update: subtrack vs optax adamw / galore.

Measures what a user runs: the example's whole byte-level LLaMA parameter
tree (``examples/_llama.py``; attention and MLP kernels projected, rank and
interval of the config), ``chain(clip_by_global_norm(1), <optimizer>)``,
``tx.update`` jitted with the state donated (:func:`donated_update`: the new
state returned before the updates, so that each state leaf's buffer holds its
own new value):

* per (optimizer, depth), each compile in a fresh process: compile time,
  ``memory_analysis()`` (argument, output, alias, temp and
  peak = argument + output - alias + temp), optimized-HLO instruction count,
  distinct fusion kernels (:func:`hlo_kernels`), optimizer-state bytes;
  with ``--train-step`` also the compile time and memory of the full train
  step (forward + backward + update);
* per depth, in one process, interleaved: the ordinary step, the
  subspace-update step (count = k) and the first step (count = 0), medians
  over ``--repeats``; amortized at ``k``: ``((k - 1) ordinary + update) / k``;
* ``--rss``: the example's training peak RSS over a few steps, each
  optimizer in its own process (``--rss-repeats`` samples each,
  interleaved; the median is reported beside the samples).

Optimizers: ``adamw``, ``galore`` (optax.contrib, ``scale_by_adam``), and
subtrack as ``subtrack`` (defaults), ``subtrack/svd``, ``subtrack/stagger``
and ``subtrack/scanned`` (the same model with each kind of block kernel
stacked over layers, ``(L, m, n)``, batch axis = layer); for attributing
subtrack's costs, also ``subtrack/norecovery``, ``subtrack/frozen`` and
``subtrack/nosubspace``, ``subtrack/productonly`` (:data:`ATTRIBUTION`,
named explicitly).

Usage::

  python benchmarks/model_scale.py --config 60m --layers 8,16
  python benchmarks/model_scale.py --config tiny --layers 2 --repeats 1 \\
      --out /tmp/x          # the smoke test's run

Writes ``<out>.json`` and ``<out>.md`` (default
``benchmarks/results/model_scale_<config>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
OPTIMIZERS = ("adamw", "galore", "subtrack", "subtrack/svd",
              "subtrack/stagger", "subtrack/scanned")
# Where subtrack's cost comes from (not run by default: name them in
# --optimizers): without recovery scaling; `frozen` (the first basis, no
# refresh, no transport); the sweep with no subspace-update code at all
# (`_step.subspace_step` replaced by the identity while the update is
# traced); and a tracking step reduced to the one product with the gradient
# it needs (`X P^T`; no geodesic step, no transport). The last two are
# attribution only: they train nothing useful.
ATTRIBUTION = ("subtrack/norecovery", "subtrack/frozen",
               "subtrack/nosubspace", "subtrack/productonly")
MiB = 2 ** 20


# ------------------------------------------------------------- the model --


def _imports():
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, EXAMPLES)
  import jax
  import optax
  import _llama
  import subtrack_optax as st
  return jax, optax, _llama, st


def config_of(name: str, layers: int):
  _, _, _llama, _ = _imports()
  return dataclasses.replace(_llama.CONFIGS[name], layers=layers)


def param_tree(cfg, scanned: bool = False):
  """Abstract parameters of the example's model (``scanned``: block kernels
  stacked over layers)."""
  jax, _, _llama, _ = _imports()
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def init():
    model = _llama.Llama(cfg, nnx.Rngs(0))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  params = jax.eval_shape(init)
  if not scanned:
    return params
  blocks = params["blocks"]
  first = blocks[0] if isinstance(blocks, (list, tuple)) else blocks[
      sorted(blocks)[0]]
  stacked = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((cfg.layers,) + a.shape, a.dtype), first)
  return {**{k: v for k, v in params.items() if k != "blocks"},
          "blocks": stacked}


def make_tx(name: str, cfg):
  """``chain(clip_by_global_norm(1), optimizer)`` for one optimizer name."""
  _, optax, _llama, st = _imports()
  lr = 1e-3
  if name == "adamw":
    tx = optax.adamw(lr)
  elif name == "galore":
    tx = optax.contrib.galore(
        lr, rank=cfg.rank, update_proj_gap=cfg.update_interval, scale=0.25,
        base_optimizer=optax.scale_by_adam(),
        weight_dimension_numbers=lambda p: _llama.projected_paths(
            p, optax.contrib.GaLoreDimensionNumbers(0, 1)))
  else:
    variant = name.split("/")[1] if "/" in name else ""
    if variant == "scanned":   # (L, m, n): layer axis is a batch axis
      spec = st.SubTrackDimensionNumbers(-2, -1)
    else:
      spec = st.SubTrackDimensionNumbers(0, 1)
    kw = {"svd": dict(subspace_update="svd"),
          "stagger": dict(stagger=True),
          "norecovery": dict(recovery_scaling=False),
          "frozen": dict(subspace_update="frozen")}.get(variant, {})
    tx = st.subtrack_adamw(
        lr, cfg.rank, cfg.update_interval,
        dimension_numbers=lambda p: _llama.projected_paths(p, spec), **kw)
    if variant == "nosubspace":
      tx = _without_subspace_update(tx)
    elif variant == "productonly":
      tx = _tracking_product_only(tx)
  return optax.chain(optax.clip_by_global_norm(1.0), tx)


def _traced_with(tx, module, **patches):
  """``tx`` whose update is traced with ``module``'s attributes set to
  ``patches`` (restored after each trace; benchmark-only attribution)."""
  _, optax, _, _ = _imports()

  def update(updates, state, params=None, **extra):
    real = {name: getattr(module, name) for name in patches}
    for name, value in patches.items():
      setattr(module, name, value)
    try:
      return tx.update(updates, state, params, **extra)
    finally:
      for name, value in real.items():
        setattr(module, name, value)
  return optax.GradientTransformationExtraArgs(tx.init, update)


def _without_subspace_update(tx):
  """``tx`` with every matrix's subspace step the identity (its basis,
  moments and projection passed through): the sweep and the regular step
  alone."""
  from subtrack_optax import _step  # pylint: disable=g-import-not-at-top

  def identity(cfg, frame, count, key, phase, x, s, mu, nu,
               differentiable=False, p=None):
    del cfg, frame, count, key, phase, x, differentiable
    return s, mu, nu, p
  return _traced_with(tx, _step, subspace_step=identity)


def _tracking_product_only(tx):
  """``tx`` whose tracking step takes only the product it cannot do
  without, ``Y = X_n A^T`` (``X P^T``, scaled), and keeps the basis (no
  geodesic step, no transport): a tracking step's floor."""
  import types  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from subtrack_optax import _linalg  # pylint: disable=g-import-not-at-top
  from subtrack_optax import _step  # pylint: disable=g-import-not-at-top

  def product_only(cfg, ops, count, key, s, p=None):
    del cfg, count, key
    inv = _linalg.inverse_or_zero(ops.norm())
    y = inv * ops.times_transposed(inv * p)
    # 0 * y keeps the product in the program (XLA does not fold x * 0).
    return _step.Item(s + 0.0 * y, jnp.zeros(s.shape[-1:], jnp.float32),
                      jnp.zeros([]), p)
  refresh = types.MappingProxyType({**_step.REFRESH,
                                    "grassmann": product_only})
  no_transport = lambda cfg, count, item, mu, nu: (mu, nu)
  return _traced_with(tx, _step, REFRESH=refresh, transport=no_transport)


def hlo_instructions(text: str) -> int:
  """Instructions of an optimized HLO module (all computations)."""
  return sum(1 for line in text.splitlines()
             if re.match(r"\s*(?:ROOT\s+)?[%\w.\-]+\s*=\s*\S", line))


def _computations(text: str) -> dict:
  """Each computation's instruction lines, by name."""
  comps, name = {}, None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$", line)
    if head:
      name, comps[head.group(1)] = head.group(1), []
    elif name and line.strip() == "}":
      name = None
    elif name:
      comps[name].append(line)
  return comps


def hlo_kernels(text: str) -> int:
  """Distinct fused computations of an optimized HLO module: those equal up
  to instruction names and metadata count once (XLA:CPU compiles one kernel
  for identical fusions, so this is the number of fusion kernels it
  generates code for)."""
  comps = _computations(text)

  def canonical(lines):
    return "\n".join(
        re.sub(r"%[\w.\-]+", "%",
               re.sub(r",?\s*metadata=\{[^}]*\}", "", line)).strip()
        for line in lines)

  called = set(re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", text))
  return len({canonical(comps[c]) for c in called if c in comps})


# ------------------------------------------------------------- compiling --


def donated_update(tx):
  """``tx.update`` jitted with the state donated, returning
  ``(new_state, updates)``: the new state first.

  JAX pairs each output, in output order, with the first donated input of
  the same shape and dtype (``jax.jit``'s ``donate_argnums``; in jax 0.10.2
  ``mlir._set_up_aliases``). With the updates first, an update shaped like a
  state leaf (a dense leaf's update and its Adam moments; at the 130m
  shapes, byte embeddings ``(256, 768)`` and rank-256 moments) takes that
  leaf's buffer, every later state leaf of its shape is paired one off, and
  XLA copies each: 209 copies and 71 MiB of temporaries in our 130m update,
  246 and 138 MiB in optax galore's, 111 and 14 MiB in adamw's (all of
  adamw's). A train step that returns ``(params, state)`` for donated
  ``(params, state)`` pairs them right; so does this.
  """
  jax, _, _, _ = _imports()
  return jax.jit(lambda g, s, p: tuple(reversed(tx.update(g, s, p))),
                 donate_argnums=1)


def compile_update(config: str, layers: int, name: str) -> dict:
  """Compiles the donated update once; its time, memory and size."""
  jax, _, _, _ = _imports()
  cfg = config_of(config, layers)
  params = param_tree(cfg, scanned=name.endswith("/scanned"))
  tx = make_tx(name, cfg)
  state = jax.eval_shape(tx.init, params)
  t0 = time.perf_counter()
  compiled = donated_update(tx).lower(params, state, params).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  out = {
      "compile_s": seconds,
      "argument": mem.argument_size_in_bytes,
      "output": mem.output_size_in_bytes,
      "alias": mem.alias_size_in_bytes,
      "temp": mem.temp_size_in_bytes,
      "instructions": hlo_instructions(text),
      "kernels": hlo_kernels(text),
      "state_bytes": sum(x.size * x.dtype.itemsize
                         for x in jax.tree.leaves(state)),
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def compile_train_step(config: str, layers: int, name: str) -> dict:
  """Compiles forward + backward + update (params and state donated)."""
  jax, optax, _llama, _ = _imports()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = config_of(config, layers)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: _llama.Llama(
      cfg, nnx.Rngs(0))))
  params = param_tree(cfg)
  tx = make_tx(name, cfg)

  def loss(p, batch):
    logits = nnx.merge(graphdef, p)(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  def step(p, s, batch):
    grads = jax.grad(loss)(p, batch)
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, jax.eval_shape(tx.init, params), batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {"train_compile_s": seconds, "train_temp": mem.temp_size_in_bytes,
          "train_peak": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                         - mem.alias_size_in_bytes + mem.temp_size_in_bytes)}


def in_fresh_process(fn: str, *args, timeout: float = 1800) -> dict:
  """Runs ``fn(*args)`` of this module in a new Python process."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--_call", fn,
       json.dumps(args)], capture_output=True, text=True, timeout=timeout,
      env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{fn}{args} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- timing --


def concrete_inputs(cfg, scanned: bool = False) -> tuple:
  """Zero parameters and fixed Gaussian gradients of the model's tree."""
  jax, _, _, _ = _imports()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shapes = param_tree(cfg, scanned=scanned)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  grads = jax.tree.map(
      lambda a: jax.random.normal(jax.random.key(a.size), a.shape, a.dtype),
      shapes)
  return params, grads


def time_steps(config: str, layers: int, names, repeats: int,
               kinds=("ordinary", "update", "first")) -> dict:
  """Ordinary, subspace-update and first steps (those in ``kinds``),
  interleaved; medians (s)."""
  jax, _, _, _ = _imports()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cfg = config_of(config, layers)
  runs = {}
  for name in names:
    params, grads = concrete_inputs(cfg, scanned=name.endswith("/scanned"))
    tx = make_tx(name, cfg)
    update = donated_update(tx)
    state = tx.init(params)
    state = update(grads, state, params)[0]   # compile, first basis
    runs[name] = (update, grads, params, state)

  def with_count(state, value):
    def f(path, x):
      name = jax.tree_util.keystr(path)
      is_count = name.endswith("count") and getattr(x, "ndim", 1) == 0
      return jnp.asarray(value, x.dtype) if is_count else x
    return jax.tree_util.tree_map_with_path(f, state)

  samples = {n: {kind: [] for kind in kinds} for n in names}
  counts = {kind: count for kind, count in (
      ("ordinary", cfg.update_interval + 1), ("update", cfg.update_interval),
      ("first", 0)) if kind in kinds}
  for _ in range(repeats):
    for kind, count in counts.items():
      for name in names:
        update, grads, params, state = runs[name]
        state = with_count(state, count)
        t0 = time.perf_counter()
        state, u = update(grads, state, params)
        jax.block_until_ready((u, state))
        samples[name][kind].append(time.perf_counter() - t0)
        runs[name] = (update, grads, params, state)
  out = {}
  k = cfg.update_interval
  for name, s in samples.items():
    med = {kind: statistics.median(v) for kind, v in s.items()}
    if "ordinary" in med and "update" in med:
      med["amortized"] = ((k - 1) * med["ordinary"] + med["update"]) / k
    out[name] = med
  return out


def rss_runs(names, repeats: int, run) -> dict:
  """``run(name)`` ``repeats`` times per name, the names interleaved
  (``a, b, a, b, ...``: a drift of the machine touches every optimizer
  alike); the samples by name."""
  samples = {name: [] for name in names}
  for _ in range(repeats):
    for name in names:
      samples[name].append(run(name))
  return samples


def training_rss(config: str, name: str, steps: int) -> float:
  """Peak RSS (MiB) of the example training ``steps`` steps."""
  opt = "subtrack" if name.startswith("subtrack") else name
  argv = [sys.executable, os.path.join(EXAMPLES, "pretrain_llama.py"),
          "--config", config, "--optimizer", opt, "--steps", str(steps),
          "--no-plot", "--no-progress", "--no-diagnostics",
          "--eval-batches", "1", "--corpus-mb", "1",
          # A small batch: the optimizer's memory, not the activations'.
          "--batch-size", "4", "--seq-len", "64"]
  # Run in a fresh process of its own (in_fresh_process): the example is
  # its only child, so the children's maximum RSS is the example's.
  proc = subprocess.run(argv, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"example failed: {proc.stderr[-2000:]}")
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


# --------------------------------------------------------------- reporting --


def ratios(rows: dict, ref: str = "galore") -> dict:
  """Per depth: each optimizer's figures over the reference's."""
  out = {}
  for depth, by_name in rows.items():
    base = by_name.get(ref)
    if not base:
      continue
    out[depth] = {
        name: {key: (r[key] / base[key] if base.get(key) else None)
               for key in ("temp", "peak", "compile_s", "instructions",
                           "kernels", "ordinary", "update", "amortized")
               if key in r and key in base}
        for name, r in by_name.items()}
  return out


def markdown(result: dict) -> str:
  meta = result["meta"]
  lines = [f"# Whole-model update cost: `{meta['config']}`", "",
           f"Command: `{meta['command']}`  ",
           f"Machine: {meta['machine']}; jax {meta['jax']}; {meta['date']}",
           "", "| layers | optimizer | state MiB | temp MiB | peak MiB | "
           "compile s | HLO instr | kernels | ordinary ms | update ms | "
           "amortized ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for depth, by_name in result["rows"].items():
    for name, r in by_name.items():
      ms = lambda k: f"{1e3 * r[k]:.1f}" if k in r else "-"
      lines.append(
          f"| {depth} | {name} | {r['state_bytes'] / MiB:.1f} | "
          f"{r['temp'] / MiB:.1f} | {r['peak'] / MiB:.1f} | "
          f"{r['compile_s']:.1f} | {r['instructions']} | "
          f"{r.get('kernels', '-')} | {ms('ordinary')} | "
          f"{ms('update')} | {ms('amortized')} |")
  layers = sorted(result["rows"], key=int)
  if len(layers) >= 2:
    a, b = layers[0], layers[-1]
    lines += ["", "Instructions and kernels added per layer (between the "
              "smallest and largest depth):", ""]
    for name in result["rows"][b]:
      if name in result["rows"][a]:
        per = lambda key: ((result["rows"][b][name].get(key, 0)
                            - result["rows"][a][name].get(key, 0))
                           / (int(b) - int(a)))
        lines.append(f"- {name}: {per('instructions'):.0f} instructions, "
                     f"{per('kernels'):.1f} kernels")
  lines += ["", "Ratios to galore (same depth):", ""]
  for depth, by_name in result["ratios"].items():
    for name, r in by_name.items():
      if name == "galore":
        continue
      text = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if v is not None)
      lines.append(f"- {depth} layers, {name}: {text}")
  if result.get("rss"):
    samples = result.get("rss_samples") or {}

    def rss(name, median):
      got = samples.get(name, [])
      each = " / ".join(f"{x:.0f}" for x in got)
      return f"{name} {median:.0f}" + (f" ({each})" if len(got) > 1 else "")
    lines += ["", "Example training peak RSS (MiB, median of the samples): "
              + ", ".join(rss(k, v) for k, v in result["rss"].items())]
  return "\n".join(lines) + "\n"


def machine() -> str:
  return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="60m")
  p.add_argument("--layers", default="8,16",
                 help="comma-separated depths (the config's shapes)")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help="also: " + ", ".join(ATTRIBUTION))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--train-step", action="store_true",
                 help="also compile the full train step (fresh process)")
  p.add_argument("--rss", type=int, default=0,
                 help="steps of the example for the peak-RSS column")
  p.add_argument("--rss-repeats", type=int, default=1,
                 help="samples of the peak RSS per optimizer, interleaved")
  p.add_argument("--no-timing", action="store_true")
  p.add_argument("--kinds", default="ordinary,update,first",
                 help="steps to time, interleaved (e.g. 'ordinary' alone)")
  p.add_argument("--out", default=None)
  p.add_argument("--_call", nargs=2, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args._call:  # pylint: disable=protected-access
    fn, call_args = args._call  # pylint: disable=protected-access
    print(json.dumps(globals()[fn](*json.loads(call_args))))
    return {}
  jax, _, _, _ = _imports()
  names = args.optimizers.split(",")
  rows = {}
  for layers in (int(x) for x in args.layers.split(",")):
    rows[str(layers)] = {}
    for name in names:
      r = in_fresh_process("compile_update", args.config, layers, name)
      if args.train_step and not name.endswith("/scanned"):
        r.update(in_fresh_process("compile_train_step", args.config, layers,
                                  name))
      rows[str(layers)][name] = r
      print(layers, name, json.dumps(r), flush=True)
    if not args.no_timing:
      times = in_fresh_process("time_steps", args.config, layers, names,
                               args.repeats, args.kinds.split(","))
      for name, t in times.items():
        rows[str(layers)][name].update(t)
      print(layers, "times", json.dumps(times), flush=True)
  rss, rss_samples = {}, {}
  if args.rss:
    rss_samples = rss_runs(
        [n for n in ("adamw", "galore", "subtrack") if n in names],
        args.rss_repeats,
        lambda name: in_fresh_process("training_rss", args.config, name,
                                      args.rss))
    rss = {name: statistics.median(v) for name, v in rss_samples.items()}
  command = "python benchmarks/model_scale.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  result = {"meta": {"config": args.config, "command": command,
                     "machine": machine(), "jax": jax.__version__,
                     "date": datetime.datetime.now(
                         datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
            "rows": rows, "ratios": ratios(rows), "rss": rss,
            "rss_samples": rss_samples}
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"model_scale_{args.config}")
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(out + ".md", "w") as f:
    f.write(markdown(result))
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()
