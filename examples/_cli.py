"""The example's command line, without jax: ``--help`` and argument errors
come back at once, before jax (and the model) is imported.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional, Sequence

import _configs

__all__ = ["OPTIMIZERS", "SUBSPACE_UPDATES", "build_parser", "parse_args",
           "run_dir"]

DESCRIPTION = ("Pretrain a byte-level LLaMA with SubTrack++, GaLore or AdamW "
               "(Flax NNX).")
OPTIMIZERS = ("adamw", "galore", "subtrack")
# subtrack_optax.SUBSPACE_UPDATES (tests/test_example.py checks they agree).
SUBSPACE_UPDATES = ("grassmann", "svd", "random", "frozen")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except ``None``/``False`` ones (explained in the help)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False or not action.help:
      return action.help or ""
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  """The command line of the example."""
  p = argparse.ArgumentParser(
      prog="pretrain_llama.py", description=DESCRIPTION,
      formatter_class=_HelpFormatter)
  g = p.add_argument_group("run")
  g.add_argument("--config", default="tiny", choices=list(_configs.CONFIGS),
                 help="model size (tiny, small: CPU; the rest: the paper's)")
  g.add_argument("--optimizer", default="subtrack", choices=OPTIMIZERS,
                 help="subtrack: SubTrack++ (subtrack_optax); galore: "
                 "optax.contrib.galore; adamw: optax.adamw")
  g.add_argument("--steps", type=int, default=None,
                 help="training steps (default: the config's)")
  g.add_argument("--batch-size", type=int, default=None,
                 help="sequences per step (default: the config's)")
  g.add_argument("--seq-len", type=int, default=None,
                 help="tokens (bytes) per sequence (default: the config's)")
  g.add_argument("--seed", type=int, default=0,
                 help="model init and data order")
  g.add_argument("--compute-dtype", default="float32",
                 choices=("float32", "bfloat16"),
                 help="activation dtype; parameters and optimizer state stay "
                 "float32")
  g = p.add_argument_group("data")
  g.add_argument("--data", default=None,
                 help="a text file or folder (default: the Python standard "
                 "library's sources and docs)")
  g.add_argument("--corpus-mb", type=float, default=16.0,
                 help="cap of the train split in MB")
  g.add_argument("--eval-batches", type=int, default=8,
                 help="batches of held-out windows in each evaluation")
  g.add_argument("--eval-every", type=int, default=0,
                 help="evaluate every N steps (0: only at the end)")
  g = p.add_argument_group("schedule")
  g.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default: the config's)")
  g.add_argument("--warmup", type=float, default=0.1,
                 help="warmup steps; a value < 1 is a fraction of --steps")
  g.add_argument("--min-lr-ratio", type=float, default=0.1,
                 help="final lr of the cosine decay, relative to --lr")
  g.add_argument("--clip", type=float, default=1.0,
                 help="global-norm gradient clipping (0: off)")
  g.add_argument("--weight-decay", type=float, default=0.0,
                 help="decoupled weight decay")
  g.add_argument("--b1", type=float, default=0.9, help="Adam's beta1")
  g.add_argument("--b2", type=float, default=0.999, help="Adam's beta2")
  g = p.add_argument_group("low rank (galore and subtrack)")
  g.add_argument("--rank", type=int, default=None,
                 help="projection rank (default: the config's, hidden/4)")
  g.add_argument("--update-interval", type=int, default=None,
                 help="steps between subspace updates (default: the config's)")
  g.add_argument("--scale", type=float, default=0.25,
                 help="scale of the back-projected update")
  g = p.add_argument_group("subtrack")
  g.add_argument("--subspace-update", default="grassmann",
                 choices=SUBSPACE_UPDATES,
                 help="grassmann: SubTrack tracking; svd: GaLore; random: "
                 "GoLore; frozen: keep the first basis")
  g.add_argument("--step-size", type=float, default=None,
                 help="geodesic step size (default: subtrack's)")
  g.add_argument("--raw-step", action="store_true",
                 help="normalize_tracking=False: the paper's raw step")
  g.add_argument("--no-transport", action="store_true",
                 help="transport_moments=False")
  g.add_argument("--transport", default="ldadam",
                 choices=("ldadam", "debiased", "reference", "reset"),
                 help="the form of the moment transport (transport_moments)")
  g.add_argument("--no-recovery", action="store_true",
                 help="recovery_scaling=False")
  g.add_argument("--recovery", default="orthogonal",
                 choices=("orthogonal", "reference"),
                 help="the recovery residual: X - S S^T X (orthogonal) or "
                 "the reference code's X - scale S S^T X")
  g.add_argument("--norm-growth-limit", type=float, default=1.01,
                 help="max growth per step of the recovery term's norm")
  g.add_argument("--basis-side", default="small", choices=("small", "large"),
                 help="which side of each matrix the basis spans")
  g.add_argument("--stagger", action="store_true",
                 help="per-leaf phases of the subspace updates")
  g.add_argument("--no-diagnostics", action="store_true",
                 help="do not compute captured energy / rotation angles")
  g = p.add_argument_group("devices, checkpoints, output")
  g.add_argument("--mesh", default="none",
                 help="'none' (one device), 'auto' (FSDP over all devices) "
                 "or 'DATAxFSDP', e.g. '2x4'")
  g.add_argument("--checkpoint-dir", default=None,
                 help="orbax checkpoints: saved here, resumed from here")
  g.add_argument("--checkpoint-every", type=int, default=0,
                 help="save every N steps (0: only at the end)")
  g.add_argument("--stop-after", type=int, default=None,
                 help="stop (and checkpoint) after this many steps, as if "
                 "preempted; --steps still sets the schedule")
  g.add_argument("--out-dir", default=None,
                 help="write metrics.jsonl and loss.png here; 'none': do "
                 "not. Default: runs/CONFIG-OPTIMIZER-TIME from the command "
                 "line, none when main(argv) is called from Python")
  g.add_argument("--log-every", type=int, default=10,
                 help="steps between syncs to the host (diagnostics records, "
                 "progress bar)")
  g.add_argument("--no-plot", action="store_true", help="no loss.png")
  g.add_argument("--no-progress", action="store_true",
                 help="no tqdm progress bar")
  return p


# (flag, test, what it must be): checked after parsing; None = not given.
_CHECKS = (
    ("steps", lambda v: v >= 1, "a positive number of steps"),
    ("batch_size", lambda v: v >= 1, "positive"),
    ("seq_len", lambda v: v >= 2, "at least 2 (inputs and next-byte targets)"),
    ("lr", lambda v: v > 0 and math.isfinite(v), "a positive learning rate"),
    ("rank", lambda v: v >= 1, "a positive rank"),
    ("update_interval", lambda v: v >= 1, "positive"),
    ("corpus_mb", lambda v: v > 0, "positive"),
    ("eval_batches", lambda v: v >= 1, "positive"),
    ("eval_every", lambda v: v >= 0, "0 (off) or positive"),
    ("warmup", lambda v: v >= 0, "0 or more"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("clip", lambda v: v >= 0, "0 (off) or positive"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("scale", lambda v: v > 0, "positive"),
    ("step_size", lambda v: v > 0, "positive"),
    ("norm_growth_limit", lambda v: v >= 1, "at least 1"),
    ("checkpoint_every", lambda v: v >= 0, "0 (only at the end) or positive"),
    ("stop_after", lambda v: v >= 1, "positive"),
    ("log_every", lambda v: v >= 1, "positive"),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses and checks ``argv``; exits with a usage error naming the flag."""
  parser = build_parser()
  args = parser.parse_args(argv)
  for name, ok, what in _CHECKS:
    value = getattr(args, name)
    if value is not None and not ok(value):
      parser.error(f"--{name.replace('_', '-')} must be {what}, got {value}")
  return args


def run_dir(args: argparse.Namespace, command_line: bool) -> Optional[str]:
  """Where the run writes ``metrics.jsonl`` and ``loss.png`` (or None)."""
  if args.out_dir is not None:
    return None if args.out_dir.lower() == "none" else args.out_dir
  if not command_line:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{args.config}-{args.optimizer}-{stamp}")
