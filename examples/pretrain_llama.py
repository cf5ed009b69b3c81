r"""Pretrain a byte-level LLaMA with SubTrack++, GaLore or AdamW (Flax NNX).

The paper's setting at laptop size: a LLaMA decoder (RMSNorm, rotary
embeddings, SwiGLU, no biases) where the attention and MLP matrices are
trained in a low-rank tracked subspace and everything else (embedding, norms,
head) with dense Adam. The default data is the Python standard library's
source and docs text (nothing is downloaded); ``--data PATH`` trains on any
text file or folder.

Usage::

  python examples/pretrain_llama.py --config tiny --steps 20 --optimizer subtrack
  python examples/pretrain_llama.py --config small --optimizer adamw --out-dir runs/adamw
  python examples/pretrain_llama.py --config small --subspace-update svd   # GaLore (ours)
  python examples/pretrain_llama.py --config 60m --mesh auto --checkpoint-dir ckpt

Every run prints a line ``... eval loss X ...``; the run directory
(``--out-dir``; from the command line by default ``runs/CONFIG-OPTIMIZER-TIME``,
printed at the end) gets ``metrics.jsonl`` (one JSON record per line:
``config``, ``train``, ``eval``, ``summary``) and ``loss.png``. With ``--checkpoint-dir`` the run saves (orbax)
every ``--checkpoint-every`` steps and at the end, and resumes from the latest
checkpoint there; batches are a function of ``(seed, step)`` and the training
step is deterministic, so a resumed run continues exactly as an uninterrupted
one would.

The training loop is NNX's functional form: the model is split once into a
graph definition and a pure dict of parameters, and the jitted step merges
them (``nnx.merge``), differentiates and applies the optax update. That keeps
params and optimizer state plain pytrees (sharding, orbax checkpoints) and
lets repeated calls of :func:`main` in one process reuse compiled steps.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import _cli  # noqa: E402  (no jax)

if __name__ == "__main__":
  # --help and argument errors exit here, before jax is imported.
  _cli.parse_args(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import _data  # noqa: E402
import _llama  # noqa: E402
import subtrack_optax as st  # noqa: E402

__all__ = ["build_parser", "main", "make_optimizer", "Run"]

build_parser = _cli.build_parser

# --------------------------------------------------------------------------
# Optimizers.


def _subtrack_dims(params):
  return _llama.projected_paths(params, st.SubTrackDimensionNumbers(0, 1))


def _galore_dims(params):
  return _llama.projected_paths(
      params, optax.contrib.GaLoreDimensionNumbers(0, 1))


@dataclasses.dataclass(frozen=True)
class OptSpec:
  """Everything that defines the optimizer (hashable: a compile-cache key)."""

  name: str
  lr: float
  steps: int
  warmup: int
  min_lr_ratio: float
  clip: float
  weight_decay: float
  b1: float
  b2: float
  rank: int
  update_interval: int
  scale: float
  subspace_update: str
  step_size: Optional[float]
  normalize_tracking: bool
  transport_moments: bool
  recovery_scaling: bool
  norm_growth_limit: float
  basis_side: str
  stagger: bool
  seed: int

  def subtrack_kwargs(self) -> dict[str, Any]:
    kw = dict(subspace_update=self.subspace_update,
              normalize_tracking=self.normalize_tracking, scale=self.scale,
              b1=self.b1, b2=self.b2,
              transport_moments=self.transport_moments,
              recovery_scaling=self.recovery_scaling,
              norm_growth_limit=self.norm_growth_limit,
              basis_side=self.basis_side, dimension_numbers=_subtrack_dims,
              stagger=self.stagger, seed=self.seed)
    if self.step_size is not None:
      kw["step_size"] = self.step_size
    return kw


def schedule_of(spec: OptSpec) -> optax.Schedule:
  """Linear warmup from 0, cosine decay to ``min_lr_ratio * lr``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=spec.lr, warmup_steps=spec.warmup,
      decay_steps=max(spec.steps, spec.warmup + 1),
      end_value=spec.lr * spec.min_lr_ratio)


def make_optimizer(spec: OptSpec) -> optax.GradientTransformation:
  """``clip_by_global_norm`` then AdamW, optax GaLore or SubTrack++.

  The low-rank optimizers project the attention and MLP kernels only; the
  embedding, norms and head get dense Adam (as in the paper).
  """
  lr = schedule_of(spec)
  clip = (optax.clip_by_global_norm(spec.clip) if spec.clip > 0
          else optax.identity())
  if spec.name == "adamw":
    tx = optax.adamw(lr, b1=spec.b1, b2=spec.b2,
                     weight_decay=spec.weight_decay)
  elif spec.name == "galore":
    tx = optax.contrib.galore(
        lr, rank=spec.rank, update_proj_gap=spec.update_interval,
        scale=spec.scale,
        base_optimizer=optax.scale_by_adam(b1=spec.b1, b2=spec.b2),
        weight_decay=spec.weight_decay, weight_dimension_numbers=_galore_dims)
  elif spec.name == "subtrack":
    tx = st.subtrack_adamw(lr, spec.rank, spec.update_interval,
                           weight_decay=spec.weight_decay,
                           **spec.subtrack_kwargs())
  else:
    raise ValueError(f"unknown optimizer {spec.name!r}")
  return optax.chain(clip, tx)


# --------------------------------------------------------------------------
# Devices.


def make_mesh(text: str) -> Optional[jax.sharding.Mesh]:
  """``none`` -> None; ``auto`` -> (1, n) mesh; ``DxF`` -> (D, F) mesh."""
  if text in ("none", "", None):
    return None
  n = jax.device_count()
  if text == "auto":
    shape = (1, n)
  else:
    try:
      shape = tuple(int(v) for v in text.lower().split("x"))
      assert len(shape) == 2
    except (ValueError, AssertionError):
      raise ValueError(f"--mesh must be 'none', 'auto' or 'DATAxFSDP', got "
                       f"{text!r}") from None
  if shape[0] * shape[1] > n:
    raise ValueError(f"--mesh {text} needs {shape[0] * shape[1]} devices, "
                     f"{n} available")
  return jax.make_mesh(shape, ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:shape[0] * shape[1]])


def fsdp_spec(shape, n_fsdp: int) -> P:
  """Shard the largest axis that divides by the fsdp size; else replicate."""
  if n_fsdp <= 1 or not shape:
    return P()
  order = sorted(range(len(shape)), key=lambda a: -shape[a])
  for a in order:
    if shape[a] % n_fsdp == 0:
      return P(*[("fsdp" if i == a else None) for i in range(len(shape))])
  return P()


# --------------------------------------------------------------------------
# The compiled pieces, cached per (model, optimizer, shapes, mesh).


@dataclasses.dataclass
class Run:
  """Compiled functions and shardings of one configuration."""

  cfg: _llama.LlamaConfig
  spec: OptSpec
  tx: optax.GradientTransformation
  graphdef: Any
  init: Any            # (seed) -> (params, opt_state)
  train_step: Any      # (params, opt_state, batch) -> (params, opt_state, m)
  eval_step: Any       # (params, batch) -> loss
  abstract: Any        # shapes/shardings of (params, opt_state)
  placement: Any       # device or shardings of (params, opt_state)
  batch_sharding: Any
  diagnostics: bool
  compiled: dict = dataclasses.field(default_factory=dict)

  def compiled_step(self, batch_size: int, seq_len: int):
    """The train step compiled ahead of time for ``(batch_size, seq_len)``.

    :func:`main` calls this before any parameter exists: the compiler's
    working set (hundreds of MiB for a large program) then comes and goes
    before the parameters, gradients and optimizer state are allocated,
    and :func:`_release_freed_heap` hands its freed pages back, so the
    process's peak RSS is the larger of the two, not their sum.
    """
    key = (batch_size, seq_len)
    if key not in self.compiled:
      batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32,
                                   sharding=self.batch_sharding)
      self.compiled[key] = self.train_step.lower(*self.abstract,
                                                 batch).compile()
      _release_freed_heap()
    return self.compiled[key]


def _release_freed_heap() -> None:
  """Hands the C heap's free pages back to the OS (glibc ``malloc_trim``).

  XLA frees most of a compile's working set when the compile ends, but
  glibc keeps freed heap pages mapped: without this, the process's RSS
  stays at the compile's peak and training memory comes on top of it
  (measured: README, "Whole-model cost of the update"). A no-op where the
  C library has no ``malloc_trim`` (macOS, musl).
  """
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return
  trim(0)


def _loss(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()


@functools.lru_cache(maxsize=16)
def build(config: str, spec: OptSpec, compute_dtype: str, mesh_text: str,
          diagnostics: bool) -> Run:
  """Builds (and caches) the model, optimizer and jitted functions.

  The model seed is an argument of the compiled ``init`` (not part of the
  cache key), so runs that differ only in seed share every compile.
  """
  cfg = _llama.CONFIGS[config]
  dtype = None if compute_dtype == "float32" else jnp.dtype(compute_dtype)
  tx = make_optimizer(spec)
  mesh = make_mesh(mesh_text)

  def init_params(seed):
    model = _llama.Llama(cfg, nnx.Rngs(jax.random.key(seed)), dtype=dtype)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  abstract_model = nnx.eval_shape(
      lambda: _llama.Llama(cfg, nnx.Rngs(0), dtype=dtype))
  graphdef = nnx.graphdef(abstract_model)
  abstract_params = jax.eval_shape(init_params, 0)

  param_sh = state_sh = batch_sh = None
  if mesh is not None:
    n_fsdp = mesh.shape["fsdp"]
    param_specs = jax.tree.map(lambda a: fsdp_spec(a.shape, n_fsdp),
                               abstract_params)
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                            is_leaf=lambda x: isinstance(x, P))
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
    if spec.name == "subtrack" and hasattr(st, "partition_specs"):
      state_specs = st.partition_specs(tx, abstract_params, param_specs,
                                       mesh=mesh)
      state_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs,
                              is_leaf=lambda x: isinstance(x, P))

  def init(seed):
    params = init_params(seed)
    return params, tx.init(params)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(functools.partial(_loss, graphdef))(
        params, batch)
    updates, new_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if diagnostics:
      diag = st.subspace_diagnostics(grads, new_state, opt_state)
      metrics["energy"] = {k: jnp.mean(d.captured_energy)
                           for k, d in diag.items()}
      metrics["angle"] = {k: jnp.max(d.rotation_angle)
                          for k, d in diag.items()}
    return new_params, new_state, metrics

  out_sh = (param_sh, state_sh) if mesh is not None else None
  # Compile init ahead of time: its output shardings (chosen by the compiler
  # where we gave none) are where restored checkpoints go, and what the
  # training step keeps.
  init_c = jax.jit(init, out_shardings=out_sh).lower(
      jax.ShapeDtypeStruct((), jnp.int32)).compile()
  placement = init_c.output_shardings
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init, 0), placement)
  train_j = jax.jit(
      train_step, donate_argnums=(0, 1),
      out_shardings=(*placement, None))
  eval_j = jax.jit(functools.partial(_loss, graphdef))
  return Run(cfg=cfg, spec=spec, tx=tx, graphdef=graphdef, init=init_c,
             train_step=train_j, eval_step=eval_j, abstract=abstract,
             placement=placement, batch_sharding=batch_sh,
             diagnostics=diagnostics)


# --------------------------------------------------------------------------
# Checkpoints (orbax).


def _checkpoint_manager(directory: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=2,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(mgr, step, params, opt_state):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr.save(step, args=ocp.args.StandardSave(
      {"params": params, "opt_state": opt_state}), force=True)
  mgr.wait_until_finished()


def _restore(mgr, step, abstract):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params, opt_state = abstract
  target = {"params": params, "opt_state": opt_state}
  out = mgr.restore(step, args=ocp.args.StandardRestore(target))
  return out["params"], out["opt_state"]


# --------------------------------------------------------------------------
# Output.


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _short(path: str) -> str:
  """``"['blocks'][0]['attn']['q']['kernel']"`` -> ``"blocks.0.attn.q"``."""
  parts = [s.strip("'\"") for s in path.replace("]", "").split("[") if s]
  if parts and parts[-1] == "kernel":
    parts = parts[:-1]
  return ".".join(parts)


class _Writer:
  """Appends JSON records to ``out_dir/metrics.jsonl`` (or does nothing)."""

  def __init__(self, out_dir: Optional[str], resume_step: int):
    self.path = None
    if out_dir is None:
      return
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if resume_step > 0 and os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          rec = json.loads(line)
          if rec.get("type") in ("train", "eval") and rec["step"] <= resume_step:
            kept.append(line)
          elif rec.get("type") == "config" and not kept:
            kept.append(line)
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, record: dict):
    if self.path is not None:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def records(self, kind: str) -> list[dict]:
    if self.path is None:
      return []
    with open(self.path) as f:
      return [r for r in map(json.loads, f) if r.get("type") == kind]


def plot_losses(path: str, train: list[dict], evals: list[dict], title: str):
  """Training (and eval) loss against step, saved as a PNG.

  Uses a bare ``Figure`` (Agg canvas), not pyplot, so it neither needs a
  display nor changes the backend of a notebook that calls :func:`main`.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1,
          label="train")
  if evals:
    ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-",
            label="eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / byte)")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------
# Main.


def _opt_spec(args, cfg, steps) -> OptSpec:
  warmup = (int(round(args.warmup * steps)) if args.warmup < 1
            else int(args.warmup))
  return OptSpec(
      name=args.optimizer, lr=args.lr if args.lr is not None else cfg.lr,
      steps=steps, warmup=warmup, min_lr_ratio=args.min_lr_ratio,
      clip=args.clip, weight_decay=args.weight_decay, b1=args.b1, b2=args.b2,
      rank=args.rank if args.rank is not None else cfg.rank,
      update_interval=(args.update_interval if args.update_interval
                       is not None else cfg.update_interval),
      scale=args.scale, subspace_update=args.subspace_update,
      step_size=args.step_size, normalize_tracking=not args.raw_step,
      transport_moments=False if args.no_transport else args.transport,
      recovery_scaling=False if args.no_recovery else args.recovery,
      norm_growth_limit=args.norm_growth_limit, basis_side=args.basis_side,
      stagger=args.stagger,
      # Only the "random" mode reads the seed; elsewhere keep it out of the
      # compile-cache key.
      seed=args.seed if args.subspace_update == "random" else 0)


def evaluate_batches(run: Run, params, batches) -> np.ndarray:
  """The loss of each eval batch."""
  losses = []
  for b in batches:
    if run.batch_sharding is not None:
      b = jax.device_put(b, run.batch_sharding)
    losses.append(run.eval_step(params, b))
  return np.asarray(jax.device_get(losses), np.float64)


def evaluate(run: Run, params, batches) -> float:
  """Mean loss over the eval batches."""
  return float(np.mean(evaluate_batches(run, params, batches)))


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the example; returns a summary dict (also the final params).

  Returns:
    ``{"eval_loss", "losses" (this run's per-step train losses), "steps",
    "start_step", "tokens_per_s", "opt_state_bytes", "param_bytes",
    "params", "diagnostics" (last captured energy / rotation angle per leaf),
    ...}``.
  """
  args = _cli.parse_args(argv)
  out_dir = _cli.run_dir(args, command_line=argv is None)
  cfg = _llama.CONFIGS[args.config]
  steps = args.steps if args.steps is not None else cfg.steps
  batch_size = args.batch_size or cfg.batch_size
  seq_len = args.seq_len or cfg.seq_len
  spec = _opt_spec(args, cfg, steps)
  diagnostics = args.optimizer == "subtrack" and not args.no_diagnostics
  corpus = (_data.load_path(args.data, args.corpus_mb) if args.data
            else _data.default_corpus(args.corpus_mb))

  run = build(args.config, spec, args.compute_dtype, args.mesh, diagnostics)
  # Compiled before the parameters and the optimizer state exist
  # (Run.compiled_step): the compile's memory is not added to theirs.
  train_step = run.compiled_step(batch_size, seq_len)
  mgr = _checkpoint_manager(args.checkpoint_dir) if args.checkpoint_dir else None
  start = 0
  if mgr is not None and mgr.latest_step() is not None:
    start = int(mgr.latest_step())
    params, opt_state = _restore(mgr, start, run.abstract)
    print(f"resumed from {args.checkpoint_dir} at step {start}")
  else:
    params, opt_state = run.init(np.int32(args.seed))
  # Commit every array to its device(s) the same way whether it was
  # initialized or restored, so both hit the same compiled step.
  params, opt_state = jax.device_put((params, opt_state), run.placement)
  stop = steps if args.stop_after is None else min(steps, args.stop_after)

  writer = _Writer(out_dir, start)
  n_params = _tree_bytes(run.abstract[0]) // 4
  state_bytes = _tree_bytes(run.abstract[1])
  if start == 0:
    writer.write({"type": "config", "argv": list(argv or sys.argv[1:]),
                  "config": dataclasses.asdict(cfg), "optimizer":
                  dataclasses.asdict(spec), "batch_size": batch_size,
                  "seq_len": seq_len, "corpus": repr(corpus),
                  "n_params": n_params, "opt_state_bytes": state_bytes,
                  "devices": [str(d) for d in jax.devices()]})
  print(f"{args.config}: {n_params / 1e6:.2f}M params, optimizer "
        f"{args.optimizer} (state {state_bytes / 2**20:.2f} MiB), "
        f"{batch_size}x{seq_len} tokens/step, {corpus!r}")
  if args.optimizer == "subtrack" and start == 0:
    print(st.list_leaves(run.tx, run.abstract[0]))  # each leaf: how and why

  schedule = schedule_of(spec)
  lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(max(stop, 1))))
  eval_data = _data.eval_batches(corpus.eval, args.eval_batches, batch_size,
                                 seq_len)
  pending = []
  losses = []
  last_angle: dict[str, float] = {}
  last_energy: dict[str, float] = {}
  t_first = None
  tokens_timed = 0

  def flush():
    for step_i, m in jax.device_get(pending):
      losses.append(float(m["loss"]))
      rec = {"type": "train", "step": step_i, "loss": float(m["loss"]),
             "grad_norm": float(m["grad_norm"]),
             "lr": float(lrs[step_i - 1])}
      if "energy" in m:
        for k, v in m["angle"].items():
          if float(v) != 0.0 and math.isfinite(float(v)):
            last_angle[_short(k)] = float(v)
        for k, v in m["energy"].items():
          last_energy[_short(k)] = float(v)
        if step_i % args.log_every == 0 or step_i == stop:
          rec["captured_energy"] = dict(last_energy)
          rec["rotation_angle"] = dict(last_angle)
          if last_energy:
            rec["captured_energy_mean"] = float(np.mean(list(
                last_energy.values())))
      writer.write(rec)
    pending.clear()

  bar = None
  if not args.no_progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=stop, initial=start, desc=f"{args.optimizer}",
               unit="step", dynamic_ncols=True, mininterval=0.5)
  for step in range(start, stop):
    batch = _data.train_batch(corpus.train, step, args.seed, batch_size,
                              seq_len)
    if run.batch_sharding is not None:
      batch = jax.device_put(batch, run.batch_sharding)
    params, opt_state, metrics = train_step(params, opt_state, batch)
    pending.append((step + 1, metrics))
    if step == start:
      jax.block_until_ready(metrics["loss"])
      t_first = time.perf_counter()
    else:
      tokens_timed += batch_size * seq_len
    done = step + 1
    if done % args.log_every == 0 or done == stop:
      flush()
      if bar is not None:
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if args.eval_every and done % args.eval_every == 0 and done != stop:
      writer.write({"type": "eval", "step": done,
                    "loss": evaluate(run, params, eval_data)})
    if mgr is not None and args.checkpoint_every and (
        done % args.checkpoint_every == 0) and done != stop:
      _save(mgr, done, params, opt_state)
    if bar is not None:
      bar.update(1)
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - t_first if t_first is not None else 0.0
  if bar is not None:
    bar.close()
  flush()
  if mgr is not None and stop > start:
    _save(mgr, stop, params, opt_state)

  per_batch = evaluate_batches(run, params, eval_data)
  eval_loss = float(per_batch.mean())
  # The eval estimate's own noise: standard error over the batches.
  eval_sem = (float(per_batch.std(ddof=1) / math.sqrt(len(per_batch)))
              if len(per_batch) > 1 else float("nan"))
  tokens_per_s = tokens_timed / elapsed if elapsed > 0 else float("nan")
  writer.write({"type": "eval", "step": stop, "loss": eval_loss})
  summary = {"eval_loss": eval_loss, "eval_sem": eval_sem,
             "eval_batch_losses": per_batch.tolist(), "steps": stop,
             "start_step": start,
             "tokens_per_s": tokens_per_s, "opt_state_bytes": state_bytes,
             "param_bytes": _tree_bytes(run.abstract[0]),
             "n_params": n_params,
             "captured_energy": dict(last_energy),
             "rotation_angle": dict(last_angle)}
  writer.write({"type": "summary", **summary})
  if out_dir and not args.no_plot:
    plot_losses(os.path.join(out_dir, "loss.png"),
                writer.records("train"), writer.records("eval"),
                f"{args.config} / {args.optimizer}")
  if last_energy:
    print(f"captured gradient energy (mean over projected leaves): "
          f"{np.mean(list(last_energy.values())):.3f}; last rotation angle "
          f"(max): {max(last_angle.values(), default=0.0):.4f} rad")
  if out_dir:
    print(f"run directory: {out_dir} (metrics.jsonl"
          f"{'' if args.no_plot else ', loss.png'})", flush=True)
  print(f"step {stop}: eval loss {eval_loss:.4f} "
        f"({eval_loss / math.log(2):.3f} bits/byte), train loss "
        f"{losses[-1] if losses else float('nan'):.4f}, "
        f"{tokens_per_s:,.0f} tokens/s", flush=True)
  return {**summary, "losses": losses, "params": params,
          "opt_state": opt_state}


if __name__ == "__main__":
  main()
