r"""TPU pods without a TPU: AOT-compile the paper's LLaMA update and train step
with the real XLA:TPU compiler (libtpu) on abstract v5e topologies (issue 21).

``jax.experimental.topologies.get_topology_desc("v5e:4x4", "tpu")`` gives the
chips of a v5e slice without the hardware; the parameters, gradients and
optimizer state are ``jax.ShapeDtypeStruct``\ s with ``NamedSharding``\ s on
a mesh of those chips (FSDP: each leaf's largest divisible axis over all
chips; the optimizer state laid out by ``subtrack_optax.partition_specs``
for subtrack, like its parameter for AdamW), and ``jax.jit(f).lower(...)
.compile()`` runs the TPU compiler. Per case it reports per-chip argument /
output / alias / temp bytes and the compiler's peak (``memory_analysis()``),
the optimizer state per chip against an even split, compile time, the
compiling process's peak RSS, every collective with its result shape
(flagged when as large as a projected matrix: a gathered gradient) and every
custom call.

Each case runs in its own process under a wall-time and address-space limit
(stated in the output); a case past a limit is reported as such.

Usage::

  python benchmarks/tpu_aot.py --size 1b --topology v5e:4x4 \
      --optimizers adamw subtrack --what update
  python benchmarks/tpu_aot.py --size 1b --layers 2 --what train   # smaller
  python benchmarks/tpu_aot.py --size 1b --explicit   # Explicit mesh axes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
VOCAB = 32000  # the paper's T5 tokenizer
COLLECTIVE = re.compile(
    r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# Linear-algebra kernels among custom-call targets (XLA:TPU names its QR
# "QrDecompositionBlock"/"CompactWyHelper", eigh "EighTpu", "Cholesky",
# triangular solves "...LowerTriangular"; LAPACK's on CPU, cuSOLVER's on GPU).
LINALG_CALL = re.compile(r"(?i)qr|eigh|cholesky|svd|triangular|compactwy|"
                         r"lapack|cusolver|householder|lu_?decomp|getrf|"
                         r"geqrf|syevd|potrf|gesdd")
LEGEND = ("- sizes in MiB per chip (`memory_analysis()`); *gradient-sized*: "
          "collectives whose result is as large as the smallest projected "
          "matrix with no side <= 2 x rank (`d x r`, `d x 2r` and `r x D` "
          "panels excluded); in the train step they include FSDP's "
          "parameter gathers, so compare with AdamW's")


# --------------------------------------------------------------------------
# One case (runs in its own process).


def _largest_array(shape_text: str) -> tuple:
  """Dimensions of the largest array in an HLO result shape such as
  ``f32[16,512,2048]{...}`` (or a tuple of them)."""
  arrays = [tuple(int(d) for d in ds.split(",") if d)
            for ds in re.findall(r"\[([0-9,]*)\]", shape_text)]
  return max(arrays, key=math.prod, default=())


def gradient_sized(dims: tuple, matrix: int, rank: int) -> bool:
  """A collective result as large as a projected matrix with no side of
  panel width (``<= 2 r``): a gathered gradient, not a ``d x r``,
  ``d x 2r`` or ``r x D`` panel."""
  return math.prod(dims) >= matrix and min(dims, default=0) > 2 * rank


def linalg_calls(hlo_text: str) -> list:
  """The linear-algebra custom-call targets in a compiled program's text."""
  return sorted({t for t in CUSTOM_CALL.findall(hlo_text)
                 if LINALG_CALL.search(t)})


def mesh_axes(shape: tuple, fsdp: int, tp: int) -> tuple:
  """Mesh axis per array axis: ``"fsdp"`` on the largest axis it divides
  and ``"tp"`` on the largest other axis it divides (a kernel ``(in, out)``
  split both ways); where no second axis divides by ``tp``, the largest
  axis that divides by all chips is split over both (``("fsdp", "tp")``),
  so no leaf is split fewer ways than under FSDP alone. ``None``
  elsewhere; with ``tp == 1`` this is FSDP over all chips."""
  by_size = sorted(range(len(shape)), key=lambda a: -shape[a])
  axes = [None] * len(shape)
  first = next((a for a in by_size if shape[a] % fsdp == 0), None)
  second = next((a for a in by_size if a != first and shape[a] % tp == 0),
                None) if tp > 1 and first is not None else None
  if second is not None:
    axes[first], axes[second] = "fsdp", "tp"
    return tuple(axes)
  whole = next((a for a in by_size if shape[a] % (fsdp * tp) == 0), None)
  if whole is not None:
    axes[whole] = ("fsdp", "tp") if tp > 1 else "fsdp"
  elif first is not None:
    axes[first] = "fsdp"
  return tuple(axes)


def _case(spec: dict) -> dict:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, EXAMPLES)
  import _configs  # pylint: disable=g-import-not-at-top
  import _llama  # pylint: disable=g-import-not-at-top
  import subtrack_optax as st  # pylint: disable=g-import-not-at-top

  cfg = dataclasses.replace(_configs.CONFIGS[spec["size"]], vocab=VOCAB)
  if spec["layers"]:
    cfg = dataclasses.replace(cfg, layers=spec["layers"])
  topo = topologies.get_topology_desc(spec["topology"], "tpu")
  n, tp = len(topo.devices), spec.get("tp", 1)
  axis_type = (jax.sharding.AxisType.Explicit if spec.get("explicit")
               else jax.sharding.AxisType.Auto)
  mesh = jax.sharding.Mesh(
      np.asarray(topo.devices).reshape(n // tp, tp), ("fsdp", "tp"),
      axis_types=(axis_type,) * 2)

  def spec_of(shape):
    return P(*mesh_axes(shape, n // tp, tp))

  dtype = jnp.bfloat16 if spec["what"] == "train" else None
  abstract_model = nnx.eval_shape(
      lambda: _llama.Llama(cfg, nnx.Rngs(0), dtype=dtype,
                           remat=spec.get("remat", False)))
  graphdef = nnx.graphdef(abstract_model)
  params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        params)
  param_specs = jax.tree.map(lambda a: spec_of(a.shape), params)
  is_spec = lambda x: isinstance(x, P)
  named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                     is_leaf=is_spec)
  projected = lambda p: _llama.projected_paths(
      p, st.SubTrackDimensionNumbers(0, 1))
  rank = cfg.rank
  if spec["optimizer"] == "adamw":
    tx = optax.adamw(1e-3)
  elif spec["optimizer"] == "galore":
    tx = optax.contrib.galore(
        1e-3, rank=rank, update_proj_gap=200,
        weight_dimension_numbers=lambda p: _llama.projected_paths(
            p, optax.contrib.GaLoreDimensionNumbers(0, 1)))
  else:
    mode = {"subtrack": "grassmann", "subtrack/svd": "svd"}[spec["optimizer"]]
    tx = st.subtrack_adamw(1e-3, rank, 200, subspace_update=mode,
                           dimension_numbers=projected)
  state_specs = st.partition_specs(tx, params, param_specs, mesh=mesh)
  abstract = lambda tree, specs: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                        sharding=NamedSharding(mesh, s)),
      tree, specs, is_leaf=lambda x: is_spec(x) or x is None)
  a_params = abstract(params, param_specs)
  a_state = abstract(jax.eval_shape(tx.init, params), state_specs)
  out_sh = (named(param_specs), named(state_specs))

  if spec["what"] == "update":
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    args = (a_params, a_state, a_params)
  else:
    batch = jax.ShapeDtypeStruct((spec["batch"], cfg.seq_len + 1), jnp.int32,
                                 sharding=NamedSharding(mesh, P("fsdp")))

    def step(params, state, batch):
      def loss(p, batch):
        logits = nnx.merge(graphdef, p)(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch[:, 1:]).mean()
      if spec.get("explicit"):
        # The model runs with Auto axes inside the explicit program (flax's
        # embedding lookup has no out_sharding); the gradients come back
        # typed with their parameters' shardings, and the optimizer update
        # runs in explicit mode.
        loss = jax.sharding.auto_axes(loss, out_sharding=P())
      grads = jax.grad(loss)(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    args = (a_params, a_state, batch)

  t0 = time.perf_counter()
  # Explicit axes need the mesh in context (Auto runs as before, without).
  context = (jax.set_mesh(mesh) if spec.get("explicit")
             else contextlib.nullcontext())
  with context:
    lowered = jax.jit(step, donate_argnums=(0, 1),
                      out_shardings=out_sh).lower(*args)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  matrix = min(m * k for m, k in ((cfg.hidden, cfg.hidden),
                                  (cfg.hidden, cfg.intermediate)))
  collectives = [(kind, shape, _largest_array(shape))
                 for shape, kind in COLLECTIVE.findall(text)]
  state_bytes = sum(math.prod(a.shape) * a.dtype.itemsize
                    for a in jax.tree.leaves(a_state))
  per_chip = sum(
      math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
      for a in jax.tree.leaves(a_state))
  mib = lambda b: b / 2**20
  return {
      **spec, "chips": n, "compile_s": compile_s,
      "argument_mib": mib(mem.argument_size_in_bytes),
      "output_mib": mib(mem.output_size_in_bytes),
      "alias_mib": mib(mem.alias_size_in_bytes),
      "temp_mib": mib(mem.temp_size_in_bytes),
      "peak_mib": mib(getattr(mem, "peak_memory_in_bytes", 0) or 0),
      "state_mib": mib(state_bytes), "state_per_chip_mib": mib(per_chip),
      "state_vs_even_split": per_chip / (state_bytes / n),
      "collectives": len(collectives),
      "large_collectives": [c for c in collectives
                            if gradient_sized(c[2], matrix, rank)],
      "largest_collectives": sorted(collectives, key=lambda c: -math.prod(
          c[2]))[:8],
      "custom_calls": sorted(set(CUSTOM_CALL.findall(text))),
      "linalg_custom_calls": linalg_calls(text),
      "hlo_lines": text.count("\n"),
  }


def _child(spec_json: str) -> None:
  spec = json.loads(spec_json)
  limit = int(spec["memory_gb"] * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  print(json.dumps(_case(spec)), flush=True)


# --------------------------------------------------------------------------
# Parent: one process per case, under limits.


def run_case(spec: dict) -> dict:
  """Runs one case in a child process; kills it past the time limit."""
  t0 = time.perf_counter()
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--_case",
         json.dumps(spec)], stdout=out, stderr=err,
        env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.perf_counter() - t0 > spec["time_limit_s"]:
        proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)
        return {**spec, "status": f"over the {spec['time_limit_s']} s limit",
                "rss_mib": usage.ru_maxrss / 1024}
      time.sleep(1.0)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall, rss = time.perf_counter() - t0, usage.ru_maxrss / 1024
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {**spec, "status": failure_status(stderr), "error": stderr[-1500:],
            "wall_s": wall,
            "rss_mib": rss}
  return {**json.loads(lines[-1]), "status": "ok", "wall_s": wall,
          "rss_mib": rss}


def failure_status(stderr: str) -> str:
  """Why a compile failed, from its process's stderr: the program does not
  fit a chip's HBM (XLA:TPU's ``CompileTimeHbmOom``, with both sizes), the
  compiler ran out of the address-space limit, or anything else."""
  hbm = re.search(r"CompileTimeHbmOom.*?\(([\d.]+G)\) exceeds available "
                  r"HBM \(([\d.]+G)\)", stderr)
  if hbm:
    return (f"does not fit the chip: {hbm.group(1)} of temporaries, "
            f"{hbm.group(2)} of HBM")
  # "mmap error: 12": an allocator's mmap refused with ENOMEM (the
  # address-space limit), the way the compiler dies inside libtpu.
  if any(k in stderr for k in ("MemoryError", "RESOURCE_EXHAUSTED",
                               "bad_alloc", "Cannot allocate",
                               "mmap error: 12")):
    return "over the memory limit"
  return "failed"


def markdown(rows, header) -> str:
  lines = header + ["", "| optimizer | what | layers | status | compile (s) | "
                    "compiler RSS (MiB) | argument | output | alias | temp | "
                    "peak (MiB/chip) | state/chip vs even split | "
                    "collectives (gradient-sized) | custom calls |",
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("status") != "ok":
      lines.append(f"| {r['optimizer']} | {r['what']} | {r['layers_used']} | "
                   f"{r['status']} | | {r.get('rss_mib', 0):.0f} | | | | | | "
                   "| | |")
      continue
    lines.append(
        f"| {r['optimizer']} | {r['what']} | {r['layers_used']} | ok | "
        f"{r['compile_s']:.1f} | {r['rss_mib']:.0f} | "
        f"{r['argument_mib']:.0f} | {r['output_mib']:.0f} | "
        f"{r['alias_mib']:.0f} | {r['temp_mib']:.0f} | {r['peak_mib']:.0f} | "
        f"{r['state_per_chip_mib']:.1f} MiB ({r['state_vs_even_split']:.3f}x) "
        f"| {r['collectives']} ({len(r['large_collectives'])}) | "
        f"{', '.join(r['custom_calls']) or '-'} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="1b")
  p.add_argument("--layers", type=int, default=0,
                 help="override the number of layers (0: the size's)")
  p.add_argument("--topology", default="v5e:4x4")
  p.add_argument("--tp", type=int, default=1,
                 help="tensor-parallel size: a (chips / tp, tp) mesh "
                 "('fsdp', 'tp'); 1: FSDP over all chips")
  p.add_argument("--optimizers", nargs="+",
                 default=["adamw", "subtrack", "subtrack/svd", "galore"])
  p.add_argument("--what", nargs="+", default=["update", "train"])
  p.add_argument("--explicit", action="store_true",
                 help="explicit-sharding mode: the mesh's axes are "
                 "jax.sharding.AxisType.Explicit (arrays typed with their "
                 "shardings); the train step's model runs under "
                 "jax.sharding.auto_axes, the optimizer update explicitly")
  p.add_argument("--remat", action="store_true",
                 help="train step: recompute each block's activations in "
                 "the backward pass (nnx.remat)")
  p.add_argument("--batch", type=int, default=16,
                 help="sequences per train step (global)")
  p.add_argument("--time-limit", type=int, default=1200,
                 help="seconds per compile")
  p.add_argument("--memory-gb", type=float, default=16.0,
                 help="address-space limit per compile (GiB)")
  p.add_argument("--tag", default=None)
  p.add_argument("--render", default=None,
                 help="only rewrite the markdown of this results JSON")
  p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._case is not None:
    _child(args._case)
    return []
  if args.render is not None:
    with open(args.render) as f:
      saved = json.load(f)
    header = [LEGEND if line.startswith("- sizes in MiB") else line
              for line in saved["header"]]
    with open(args.render[:-len(".json")] + ".md", "w") as f:
      f.write(markdown(saved["rows"], header))
    return saved["rows"]
  sys.path.insert(0, EXAMPLES)
  import _configs  # pylint: disable=g-import-not-at-top
  layers = args.layers or _configs.CONFIGS[args.size].layers
  rows = []
  started = datetime.datetime.now(datetime.timezone.utc)
  for what in args.what:
    for opt in args.optimizers:
      spec = {"size": args.size, "layers": args.layers, "layers_used": layers,
              "topology": args.topology, "tp": args.tp, "optimizer": opt,
              "what": what,
              "batch": args.batch, "remat": args.remat,
              "explicit": args.explicit,
              "time_limit_s": args.time_limit,
              "memory_gb": args.memory_gb}
      r = run_case(spec)
      rows.append(r)
      print(json.dumps({k: v for k, v in r.items()
                        if k not in ("large_collectives", "error")}),
            flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  try:
    import libtpu  # pylint: disable=g-import-not-at-top
    libtpu_version = getattr(libtpu, "__version__", "?")
  except ImportError:
    libtpu_version = "not installed"
  tag = args.tag or f"{args.size}_{args.topology.replace(':', '_')}" + (
      f"_{layers}l" if args.layers else "") + (
          f"_tp{args.tp}" if args.tp > 1 else "") + (
              "_explicit" if args.explicit else "")
  layout = ("FSDP over all chips" if args.tp == 1 else
            f"FSDP x tensor parallel, mesh (fsdp, tp) = (chips / {args.tp}, "
            f"{args.tp}): each kernel's largest axis over fsdp, its other "
            f"axis over tp where it divides") + (
                "; explicit-sharding mode" if args.explicit else "")
  header = [
      f"## AOT compile for `{args.topology}` ({args.size} LLaMA shapes, "
      f"{layers} layers, vocabulary {VOCAB}, {layout})", "",
      f"- command: `python benchmarks/tpu_aot.py "
      f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
      f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; jax "
      f"{jax.__version__}, libtpu {libtpu_version}; compiled on a "
      f"{os.cpu_count()}-core CPU machine (no TPU)",
      f"- limits per compile: {args.time_limit} s, {args.memory_gb:g} GiB "
      "address space; update: `tx.update` + `apply_updates` (f32, state "
      f"donated); train: forward + backward + update, bf16 compute, batch "
      f"{args.batch} x {_configs.CONFIGS[args.size].seq_len}"
      + (", blocks rematerialized" if args.remat else ""),
      LEGEND]
  md = markdown(rows, header)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"tpu_aot_{tag}.md"), "w") as f:
    f.write(md)
  with open(os.path.join(RESULTS, f"tpu_aot_{tag}.json"), "w") as f:
    json.dump({"header": header, "rows": rows}, f, indent=1)
  print(md)
  return rows


if __name__ == "__main__":
  main()
