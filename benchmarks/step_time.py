"""Optimizer step time, state and temporaries: subtrack vs optax adamw/galore.

One process, interleaved repeats, medians. For LLaMA-shaped parameter sets
(the GaLore / SubTrack++ papers' 60M ... 7B configurations) it times, under
``jax.jit`` with the optimizer state donated:

* ``optax.adamw`` (the dense baseline),
* ``optax.contrib.galore`` (SVD every ``k`` steps; ``scale=0.25`` like ours),
* ``subtrack_optax.subtrack_adamw`` in every ``subspace_update`` mode, with
  recovery scaling on and off,
* the *floor*: the two projection matmuls alone, ``P = S^T X`` and ``S P``,
  for every projected matrix (small-side basis, the same flop count as
  galore's large side),

each as a full update function ``(grads, state, params) -> (updates, state)``
(``weight_decay=0`` everywhere, so ``params`` is only passed through). The
*regular* step and the *subspace-update* step are the same compiled function
run on a state whose ``count`` is ``k + 1`` (regular) or ``k`` (update: SVD
for galore, ``subspace_update`` for subtrack). The *amortized* step is
``((k - 1) * regular + update) / k`` at ``k = 200``.

What is measured: the projected matrices of ``--layers`` transformer blocks
(default 1) of each model, as separate 2-D leaves in the Flax ``(in, out)``
layout (``q, k, v, o``: ``h x h``; ``gate, up``: ``h x I``; ``down``:
``I x h``) plus the block's two RMSNorm scales (dense). optax's galore
cannot take a stacked ``(L, m, n)`` leaf (it has no batch axes), so blocks
are separate leaves; every method's cost is a sum over matrices, so a full
model's step is the per-block time times the layer count, plus the dense
Adam of the embeddings (the same in every low-rank method; GaLore and
SubTrack++ leave embeddings and the LM head to Adam). State bytes are given
both for the measured blocks and, exactly via ``jax.eval_shape``, for the
whole model (embeddings and LM head dense, as in the papers).

Also reported: optimizer-state bytes against the spec's formula (basis
``d*r`` + moments ``2*r*D`` + one float per projected matrix, ``2*size`` per
dense leaf, one int32 count), the compiled temporary bytes
(``jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``) and
an HLO audit of one ``h x I`` and one ``I x h`` matrix (largest square array
anywhere in the compiled program; temporaries in units of the matrix).

``--stagger`` measures the per-step time over one window of ``k = 8`` steps
for ``stagger=False`` and ``stagger=True`` and prints max / median.

Usage::

  python benchmarks/step_time.py                       # 60m,130m,350m
  python benchmarks/step_time.py --sizes 60m --quick   # seconds
  python benchmarks/step_time.py --sizes 1b,7b         # GPU only
  python benchmarks/step_time.py --summarize run1.json run2.json out.md

Writes ``benchmarks/results/step_time_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subtrack_optax as st

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results")
VOCAB = 32000
LR = 1e-3
SCALE = 0.25
MODES = ("grassmann", "svd", "random", "frozen")


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """A LLaMA configuration (SubTrack++ / GaLore papers, Table 4 style)."""

  name: str
  hidden: int
  intermediate: int
  heads: int
  layers: int
  rank: int


# Hidden / intermediate / heads / layers: the LLaMA configurations used by
# GaLore (arXiv 2403.03507, Table 5) and SubTrack++ (arXiv 2502.01586,
# Table 4); ranks 128/256/256/512/1024 as in those papers' pre-training runs
# (the SubTrack++ code's published 1B command uses --rank 512).
MODELS = {
    "60m": ModelShape("60m", 512, 1376, 8, 8, 128),
    "130m": ModelShape("130m", 768, 2048, 12, 12, 256),
    "350m": ModelShape("350m", 1024, 2736, 16, 24, 256),
    "1b": ModelShape("1b", 2048, 5461, 32, 24, 512),
    "7b": ModelShape("7b", 4096, 11008, 32, 32, 1024),
}
GPU_ONLY = ("1b", "7b")


# ------------------------------------------------------------ parameters --


def block_shapes(m: ModelShape) -> dict[str, tuple[int, ...]]:
  """One transformer block, Flax (in, out) layout."""
  h, i = m.hidden, m.intermediate
  return {
      "q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h),
      "gate": (h, i), "up": (h, i), "down": (i, h),
      "attn_norm": (h,), "mlp_norm": (h,),
  }


def blocks_tree(m: ModelShape, n_layers: int, make: Callable) -> dict:
  return {f"block{j}": {k: make(s, j, k) for k, s in block_shapes(m).items()}
          for j in range(n_layers)}


def full_model_tree(m: ModelShape) -> dict:
  """Abstract (ShapeDtypeStruct) full model, for exact state bytes."""
  sds = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = blocks_tree(m, m.layers, lambda s, j, k: sds(s))
  tree["embed"] = sds((VOCAB, m.hidden))
  tree["lm_head"] = sds((m.hidden, VOCAB))
  tree["final_norm"] = sds((m.hidden,))
  return tree


def _is_embedding(path) -> bool:
  return any(getattr(k, "key", None) in ("embed", "lm_head") for k in path)


def subtrack_dims(tree):
  """Default matrix rule, but embeddings and LM head dense (as the papers)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: None if (_is_embedding(p) or len(x.shape) < 2)
      else st.SubTrackDimensionNumbers(-2, -1), tree)


def galore_dims(tree):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: None if (_is_embedding(p) or len(x.shape) != 2)
      else optax.contrib.GaLoreDimensionNumbers(0, 1), tree)


def make_optimizer(name: str, m: ModelShape, k: int, **extra):
  """The optimizers compared, all with zero weight decay."""
  if name == "adamw":
    return optax.adamw(LR, weight_decay=0.0)
  if name == "galore":
    return optax.contrib.galore(LR, rank=m.rank, update_proj_gap=k,
                                scale=SCALE,
                                weight_dimension_numbers=galore_dims)
  mode, *flags = name.split("/")
  assert mode in MODES and set(flags) <= {"norec", "large"}, name
  return st.subtrack_adamw(LR, m.rank, k, subspace_update=mode,
                           recovery_scaling="norec" not in flags,
                           basis_side="large" if "large" in flags else "small",
                           scale=SCALE, weight_decay=0.0,
                           dimension_numbers=subtrack_dims, **extra)


# ------------------------------------------------------------ accounting --


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def spec_state_bytes(tree, rank: int, basis_side: str = "small") -> int:
  """SPEC section 4: basis d*r, moments 2*r*D, one float32 per projected
  matrix; 2*size per dense leaf; one int32 count (float32 everywhere)."""
  total = 4  # count
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    s = x.shape
    if len(s) < 2 or _is_embedding(path) or min(s[-2:]) <= rank:
      total += 2 * int(np.prod(s)) * 4
      continue
    batch = int(np.prod(s[:-2]))
    d, big_d = min(s[-2:]), max(s[-2:])
    if basis_side == "large":
      d, big_d = big_d, d
    total += batch * (d * rank + 2 * rank * big_d + 1) * 4
  return total


def state_bytes(tx, tree) -> int:
  return tree_bytes(jax.eval_shape(tx.init, tree))


def set_count(state, value: int):
  """Every ``count`` field of a (chained) optimizer state set to ``value``."""

  def f(path, x):
    if path and getattr(path[-1], "name", None) == "count":
      return jnp.asarray(value, x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(f, state)


_SHAPE = re.compile(r"f32\[([0-9,]*)\]")


def largest_square(hlo_text: str) -> int:
  """Largest ``a`` such that some f32 array ends in ``(a, a)``."""
  best = 0
  for dims in _SHAPE.findall(hlo_text):
    ds = [int(v) for v in dims.split(",") if v]
    if len(ds) >= 2 and ds[-1] == ds[-2]:
      best = max(best, ds[-1])
  return best


# --------------------------------------------------------------- timing --


@dataclasses.dataclass
class Timed:
  """One compiled update function and its (donated) state."""

  name: str
  fn: Callable
  state: Any
  kinds: tuple[str, ...]
  counts: dict[str, int]
  samples: dict[str, list] = dataclasses.field(default_factory=dict)
  temp_bytes: int = 0
  state_bytes: int = 0

  def run(self, kind, grads, params):
    state = set_count(self.state, self.counts[kind])
    t0 = time.perf_counter()
    state, updates = self.fn(grads, state, params)
    jax.block_until_ready((updates, state))
    dt = time.perf_counter() - t0
    self.state = state
    del updates
    self.samples.setdefault(kind, []).append(dt)
    return dt


def donated(update: Callable) -> Callable:
  """``update`` (``(grads, state, params) -> (updates, state)``) jitted with
  the state donated and returning ``(state, updates)``: the state first.

  JAX pairs each output, in order, with the first donated input of the same
  shape and dtype; with the updates first, an update shaped like a state
  leaf takes that leaf's buffer and XLA copies the state leaves after it
  (``benchmarks/model_scale.py::donated_update`` has the counts).
  """
  return jax.jit(lambda g, s, p: tuple(reversed(update(g, s, p))),
                 donate_argnums=1)


def floor_fn():
  """The two projection matmuls per projected matrix, ``P = S^T X`` and
  ``S P``, on the matrix as it lies in memory (no transposed copies), in the
  fastest orientation found on CPU (untransposed operands: ``S^T`` copied for
  a wide ``g``, ``P^T = g S`` for a tall one), as in subtrack's step."""

  def fn(grads, bases, params):
    del params

    def one(g, s):
      if g.ndim != 2:
        return g
      if g.shape[-2] <= g.shape[-1]:       # basis on rows: X = g
        p = jax.lax.optimization_barrier(s.T) @ g
        return s @ p
      # basis on columns: X = g^T, P^T = g S
      pt = jax.lax.optimization_barrier(g @ s)
      return jnp.einsum("dr,Dr->Dd", s, pt)

    return jax.tree.map(one, grads, bases), bases

  return fn


def build(m: ModelShape, names, n_layers: int, k: int, seed: int = 0):
  key = jax.random.key(seed)
  params = blocks_tree(m, n_layers, lambda s, j, n: jnp.zeros(s, jnp.float32))
  leaves, treedef = jax.tree.flatten(params)
  grads = jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
      / math.sqrt(x.shape[0]) for i, x in enumerate(leaves)])
  timed = []
  first_states = {}
  for name in names:
    if name == "floor":
      state = jax.tree.map(
          lambda g: (jnp.linalg.qr(jax.random.normal(
              key, (min(g.shape), m.rank)))[0] if g.ndim == 2
                     else jnp.zeros((), jnp.float32)), grads)
      fn = donated(floor_fn())
      kinds, counts = ("regular",), {"regular": 0}
    else:
      tx = make_optimizer(name, m, k)
      state = tx.init(params)
      fn = donated(tx.update)
      kinds = ("regular",) if name == "adamw" else ("regular", "update")
      counts = {"regular": k + 1, "update": k}
    compiled = fn.lower(grads, state, params).compile()
    mem = compiled.memory_analysis()
    # Calls go to the compiled executable (donation included): no second
    # compilation through the jit cache.
    t = Timed(name, compiled, state, kinds, counts,
              temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0) or 0),
              state_bytes=tree_bytes(state))
    side = "large" if "/large" in name else "small"
    if name in ("floor", "adamw"):
      pass
    elif name != "galore" and side in first_states:
      # Every subtrack mode has the same state structure and the same first
      # step (the SVD of section 3 of the spec): run it once per basis side.
      state0, first_s = first_states[side]
      t.state = jax.tree.map(jnp.copy, state0)
      t.samples["first"] = list(first_s)
    else:
      # First step (count 0) before any timing: a real basis (SVD). It is
      # a cold call (first use of the executable's buffers): reported as
      # "first", never as an update sample.
      t.counts["first"] = 0
      t.run("first", grads, params)
      if name != "galore":
        first_states[side] = (jax.tree.map(jnp.copy, t.state),
                              t.samples["first"])
    timed.append(t)
  return params, grads, timed


def measure(timed, grads, params, repeats: dict[str, int]):
  """Interleaved: each round runs every function once (regular-step rounds
  first, then update-step rounds); the first round of each kind is a
  discarded warm-up (``repeats`` counts it)."""
  for kind in ("regular", "update"):
    for rnd in range(repeats[kind]):
      for t in timed:
        if kind in t.kinds:
          t.run(kind, grads, params)
          if rnd == 0:
            t.samples[kind].pop()


def med(v):
  return statistics.median(v) if v else float("nan")


# --------------------------------------------------------------- audits --


def hlo_audit(m: ModelShape, k: int) -> dict:
  """Largest square array and temporaries, one h x I and one I x h leaf."""
  out = {}
  h, i = m.hidden, m.intermediate
  params = {"gate": jnp.zeros((h, i)), "down": jnp.zeros((i, h))}
  leaf_bytes = h * i * 4
  for name in ("galore", "grassmann", "grassmann/norec", "svd", "random"):
    tx = make_optimizer(name, m, k)
    state = tx.init(params)
    c = donated(tx.update).lower(params, state, params).compile()
    mem = c.memory_analysis()
    out[name] = {
        "largest_square": largest_square(c.as_text()),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "temp_in_leaves": mem.temp_size_in_bytes / leaf_bytes,
    }
  # The regular step's own products alone (the library's per-leaf step,
  # composed of the equations), to separate its temporaries from those of
  # the SVD / refresh branches, which the compiled update holds too.
  # pylint: disable=g-import-not-at-top
  from subtrack_optax import _config, _equations, _frame, _step
  r = m.rank
  cfg = _config.Config.create(
      r, k, subspace_update="grassmann", step_size=0.5,
      normalize_tracking=True, scale=SCALE, b1=0.9, b2=0.999, eps=1e-8,
      transport_moments=True, recovery_scaling=True, norm_growth_limit=1.01,
      basis_side="small", dimension_numbers=None, basis_dtype=jnp.float32,
      mu_dtype=None, seed=0, stagger=False)
  plans = cfg.plans(params)
  f1, f2 = _frame.Frame(plans["gate"]), _frame.Frame(plans["down"])

  def regular_path(g_wide, g_tall, s1, s2, m1, v1, m2, v2):
    one = jnp.ones([], jnp.int32)
    out = []
    for f, g, s, mu, nu in ((f1, g_wide, s1, m1, v1), (f2, g_tall, s2, m2, v2)):
      sw, phi, mu, nu, prev = _step.regular_step(cfg, f, g, s, mu, nu, 1.0,
                                                 one, one + 1)
      out.append((_equations.add_recovery(f, sw, g, phi), mu, nu, prev))
    return tuple(out)

  z = lambda *sh: jnp.zeros(sh, jnp.float32)
  c = jax.jit(regular_path, donate_argnums=(4, 5, 6, 7)).lower(
      z(h, i), z(i, h), z(h, r), z(h, r), z(r, i), z(r, i), z(r, i),
      z(r, i)).compile()
  mem = c.memory_analysis()
  out["regular path only"] = {
      "largest_square": largest_square(c.as_text()),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "temp_in_leaves": mem.temp_size_in_bytes / leaf_bytes,
  }
  out["_note"] = (f"leaves ({h},{i}) and ({i},{h}); rank {m.rank}; "
                  f"2r = {2 * m.rank}; a square array larger than 2r would "
                  f"be an m x m or n x n")
  return out


def stagger_window(m: ModelShape, n_layers: int, k: int, repeats: int):
  """Step times over one k-step window, stagger off and on."""
  out = {}
  params = blocks_tree(m, n_layers, lambda s, j, n: jnp.zeros(s, jnp.float32))
  key = jax.random.key(1)
  leaves, treedef = jax.tree.flatten(params)
  grads = jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), x.shape) /
      math.sqrt(x.shape[0]) for i, x in enumerate(leaves)])
  runs = {}
  for stagger in (False, True):
    tx = make_optimizer("grassmann", m, k, stagger=stagger)
    fn = donated(tx.update)
    state = tx.init(params)
    state, u = fn(grads, state, params)  # count 0: SVD init, compile
    jax.block_until_ready(u)
    runs[stagger] = [fn, state, [[] for _ in range(k)]]
  n_proj = sum(1 for x in leaves if x.ndim == 2)
  for rep in range(repeats + 1):
    for stagger in (False, True):
      fn, state, samples = runs[stagger]
      for step in range(k, 2 * k):
        state = set_count(state, step)
        t0 = time.perf_counter()
        state, u = fn(grads, state, params)
        jax.block_until_ready((u, state))
        if rep:
          samples[step - k].append(time.perf_counter() - t0)
      runs[stagger][1] = state
  for stagger in (False, True):
    per_step = [med(v) for v in runs[stagger][2]]
    out["on" if stagger else "off"] = {
        "step_ms": [1e3 * v for v in per_step],
        "max_over_median": max(per_step) / statistics.median(per_step),
    }
  out["_note"] = (f"{m.name}, {n_layers} blocks = {n_proj} projected "
                  f"matrices, k = {k}, grassmann, recovery on; steps k..2k-1")
  return out


# ----------------------------------------------------------------- main --


def machine() -> dict:
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }


def method_names(args) -> list[str]:
  if args.methods:
    return [n.strip() for n in args.methods.split(",") if n.strip()]
  if args.quick:
    return ["floor", "adamw", "galore", "grassmann", "grassmann/norec"]
  names = ["floor", "adamw", "galore"]
  for mode in MODES:
    names += [mode, mode + "/norec"]
  return names + ["grassmann/large"]


def run_size(m: ModelShape, args) -> dict:
  k = args.interval
  names = method_names(args)
  print(f"\n== {m.name}: {args.layers} block(s) of h={m.hidden}, "
        f"I={m.intermediate}, rank {m.rank}; compiling {len(names)} "
        "functions ...", flush=True)
  t0 = time.perf_counter()
  params, grads, timed = build(m, names, args.layers, k)
  print(f"   built in {time.perf_counter() - t0:.0f} s", flush=True)
  measure(timed, grads, params,
          {"regular": args.repeats + 1, "update": args.update_repeats + 1})
  rows = {}
  for t in timed:
    reg = med(t.samples.get("regular", []))
    upd = med(t.samples.get("update", [])) if "update" in t.kinds else reg
    rows[t.name] = {
        "regular_ms": 1e3 * reg,
        "update_ms": 1e3 * upd,
        "amortized_ms": 1e3 * ((k_amort - 1) * reg + upd) / k_amort,
        "first_ms": 1e3 * med(t.samples.get("first", [])),
        "regular_samples_ms": [1e3 * v for v in t.samples.get("regular", [])],
        "update_samples_ms": [1e3 * v for v in t.samples.get("update", [])],
        "state_bytes": t.state_bytes,
        "temp_bytes": t.temp_bytes,
    }
  # exact full-model state bytes (abstract) against the spec's formula
  full = full_model_tree(m)
  blocks = jax.eval_shape(lambda: params)
  for name in rows:
    if name == "floor":
      continue
    tx = make_optimizer(name, m, k)
    rows[name]["state_bytes_full_model"] = state_bytes(tx, full)
    side = "large" if "/large" in name else "small"
    rows[name]["spec_state_bytes"] = {
        "blocks": spec_state_bytes(blocks, m.rank, side),
        "full_model": spec_state_bytes(full, m.rank, side)}
  formula = {"blocks": spec_state_bytes(blocks, m.rank),
             "full_model": spec_state_bytes(full, m.rank)}
  result = {
      "model": dataclasses.asdict(m),
      "measured_blocks": args.layers,
      "update_interval_timed": k,
      "amortized_k": k_amort,
      "grad_bytes_blocks": tree_bytes(blocks),
      "rows": rows,
      "spec_state_bytes": formula,
      "ratios": ratios(rows, formula),
  }
  if not args.quick:
    result["hlo_audit"] = hlo_audit(m, k)
  print_size(result)
  return result


k_amort = 200  # the amortization interval of the targets


def ratios(rows, formula) -> dict:
  g, f = rows["galore"], rows["floor"]
  out = {}
  for name, r in rows.items():
    if name in ("floor", "adamw", "galore"):
      continue
    paired = lambda a, b: med([x / y for x, y in zip(a, b)])
    out[name] = {
        "regular/galore_regular_paired": paired(
            r["regular_samples_ms"], g["regular_samples_ms"]),
        "regular/floor_paired": paired(
            r["regular_samples_ms"], f["regular_samples_ms"]),
        "regular/galore_regular": r["regular_ms"] / g["regular_ms"],
        "regular/floor": r["regular_ms"] / f["regular_ms"],
        "update/galore_update": r["update_ms"] / g["update_ms"],
        # galore's SVD (LAPACK gesdd) varies by 10x or more between
        # identical calls on a loaded machine: also against its fastest call
        "update/galore_update_fastest": r["update_ms"] / min(
            g["update_samples_ms"]),
        "amortized/galore_amortized": r["amortized_ms"] / g["amortized_ms"],
        "state_bytes_equal_spec": (
            r["state_bytes"] == r["spec_state_bytes"]["blocks"]
            and r["state_bytes_full_model"]
            == r["spec_state_bytes"]["full_model"]),
    }
  out["galore/floor"] = g["regular_ms"] / f["regular_ms"]
  # The best amortized ratio any method could reach: a step that is the
  # two projection matmuls alone, with a free subspace update.
  out["floor/galore_amortized"] = f["regular_ms"] / g["amortized_ms"]
  return out


TARGETS = (
    ("regular/galore_regular", 1.0),
    ("regular/floor", 1.3),
    ("update/galore_update", 0.15),
    ("amortized/galore_amortized", 0.8),
)


def _mark(value, limit, name="grassmann", key=""):
  if not _applies(name, key):
    return ""
  return "ok" if value <= limit else "MISS"


def _applies(name: str, key: str) -> bool:
  """The update-step target is for tracking (grassmann) only."""
  return key != "update/galore_update" or name.split("/")[0] == "grassmann"


def print_size(res):
  rows, rt = res["rows"], res["ratios"]
  print(f"   {'method':<18}{'regular ms':>11}{'update ms':>11}"
        f"{'amort. ms':>11}{'first ms':>10}{'state MB':>10}{'model MB':>10}"
        f"{'temp MB':>9}")
  for name, r in rows.items():
    full = r.get("state_bytes_full_model")
    print(f"   {name:<18}{r['regular_ms']:>11.2f}{r['update_ms']:>11.1f}"
          f"{r['amortized_ms']:>11.2f}{r['first_ms']:>10.0f}"
          f"{r['state_bytes'] / 2**20:>10.2f}"
          f"{(full or 0) / 2**20:>10.1f}{r['temp_bytes'] / 2**20:>9.2f}")
  print(f"   galore regular / floor = {rt['galore/floor']:.2f}; floor / "
        f"galore amortized = {rt['floor/galore_amortized']:.3f} (the best "
        "amortized ratio possible)")
  print("   ratio (target): " + ", ".join(f"{key} (<= {lim})"
                                         for key, lim in TARGETS))
  for name, v in rt.items():
    if not isinstance(v, dict):
      continue
    cells = "  ".join(f"{v[key]:6.3f} {_mark(v[key], lim, name, key):<4}"
                      for key, lim in TARGETS)
    print(f"   {name:<18}{cells}  paired reg/galore "
          f"{v['regular/galore_regular_paired']:.3f}, reg/floor "
          f"{v['regular/floor_paired']:.3f}; state = spec: "
          f"{v['state_bytes_equal_spec']}")
  if "hlo_audit" in res:
    for name, a in res["hlo_audit"].items():
      if name.startswith("_"):
        continue
      print(f"   audit {name:<16} largest square {a['largest_square']:>5}  "
            f"temp = {a['temp_in_leaves']:.2f} x one h x I matrix")


def markdown(results, meta, command) -> str:
  lines = [
      "# Optimizer step time (benchmarks/step_time.py)",
      "",
      f"Command: `{command}`  ",
      f"Machine: {meta['device']} ({meta['backend']}), "
      f"{meta['cpu_count']} cores, {meta['platform']}; jax {meta['jax']}, "
      f"optax {meta['optax']}; load average at start {meta['loadavg']}  ",
      f"Date: {meta['date']}",
      "",
      "Per-step times are medians of interleaved repeats on one process, "
      "for the projected matrices (+ norms) of the measured blocks; ratios "
      "with recovery scaling on unless the row says `/norec`. Targets: "
      "regular <= 1.0 x galore regular and <= 1.3 x floor; tracking "
      "(grassmann subspace-update) step <= 0.15 x galore's SVD step; "
      f"amortized (k = {k_amort}) <= 0.8 x galore's. galore's SVD step "
      "(LAPACK) varies by 10x or more between identical calls on a loaded "
      "machine: see the samples in the JSON file.",
      "",
  ]
  for res in results.get("sizes", []):
    m = res["model"]
    lines += [f"## {m['name']} (h={m['hidden']}, I={m['intermediate']}, "
              f"rank {m['rank']}, {res['measured_blocks']} of "
              f"{m['layers']} blocks measured)", "",
              "| method | regular ms | update ms | amortized ms | "
              "first step ms | regular / galore | regular / floor | "
              "update / galore | amortized / galore | state MB (blocks) | "
              "state MB (model) | temp MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
      rt = res["ratios"].get(name, {})
      lim = dict(TARGETS)
      f = lambda key: (f"{rt[key]:.3f}" + (
          "" if rt[key] <= lim[key] or not _applies(name, key)
          else " (miss)") if key in rt else "")
      full = r.get("state_bytes_full_model")
      first = "" if math.isnan(r["first_ms"]) else f"{r['first_ms']:.0f}"
      lines.append(
          f"| {name} | {r['regular_ms']:.2f} | {r['update_ms']:.1f} | "
          f"{r['amortized_ms']:.2f} | {first} | "
          f"{f('regular/galore_regular')} | "
          f"{f('regular/floor')} | {f('update/galore_update')} | "
          f"{f('amortized/galore_amortized')} | "
          f"{r['state_bytes'] / 2**20:.2f} | "
          f"{'' if full is None else f'{full / 2**20:.1f}'} | "
          f"{r['temp_bytes'] / 2**20:.2f} |")
    sp = res["spec_state_bytes"]
    lines += ["", f"Spec state formula: {sp['blocks'] / 2**20:.3f} MB "
              f"(blocks), {sp['full_model'] / 2**20:.1f} MB (model); "
              "every subtrack row equals it: "
              f"{all(v['state_bytes_equal_spec'] for k, v in res['ratios'].items() if isinstance(v, dict))}.",
              ""]
    if "hlo_audit" in res:
      a = res["hlo_audit"]
      lines += [f"HLO audit ({a['_note']}):", "",
                "| method | largest square array | temp (x one h x I) |",
                "|---|---|---|"]
      for name, v in a.items():
        if not name.startswith("_"):
          lines.append(f"| {name} | {v['largest_square']} | "
                       f"{v['temp_in_leaves']:.2f} |")
      lines.append("")
  if "stagger" in results:
    s = results["stagger"]
    lines += ["## Stagger", "", s["_note"], "",
              "| stagger | max / median | per-step ms |", "|---|---|---|"]
    for key in ("off", "on"):
      lines.append(f"| {key} | {s[key]['max_over_median']:.2f} | "
                   + ", ".join(f"{v:.1f}" for v in s[key]["step_ms"]) + " |")
    lines.append("")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="60m,130m,350m",
                      help="comma list of " + ",".join(MODELS))
  parser.add_argument("--layers", type=int, default=1,
                      help="transformer blocks measured per size")
  parser.add_argument("--repeats", type=int, default=7,
                      help="regular-step samples per function")
  parser.add_argument("--update-repeats", type=int, default=3,
                      help="subspace-update-step samples per function (after "
                      "one discarded warm-up call)")
  parser.add_argument("--interval", type=int, default=200,
                      help="update interval k of the timed optimizers")
  parser.add_argument("--methods", default=None,
                      help="comma list among floor, adamw, galore, "
                      "<mode>, <mode>/norec (default: all)")
  parser.add_argument("--quick", action="store_true",
                      help="fewer functions and repeats, no audit/stagger")
  parser.add_argument("--no-stagger", action="store_true")
  parser.add_argument("--stagger-size", default="60m")
  parser.add_argument("--stagger-layers", type=int, default=8)
  parser.add_argument("--stagger-repeats", type=int, default=3)
  parser.add_argument("--tag", default=None,
                      help="results file suffix (default: backend)")
  parser.add_argument("--out", default=RESULTS_DIR)
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats = min(args.repeats, 3)
    args.update_repeats = min(args.update_repeats, 1)
  args.error = parser.error
  return args


def summarize(paths, out_md=None) -> str:
  """Median, over several result files, of every ratio (and time)."""
  runs = []
  for path in paths:
    with open(path) as f:
      runs.append(json.load(f))
  lines = ["# Step time, median over runs", "",
           "Runs: " + ", ".join(f"`{os.path.basename(p)}` "
                                f"({r['meta']['date']}, load "
                                f"{[round(x, 1) for x in r['meta']['loadavg']]})"
                                for p, r in zip(paths, runs)),
           "",
           f"Machine: {runs[0]['meta']['device']} "
           f"({runs[0]['meta']['backend']}), {runs[0]['meta']['cpu_count']} "
           f"cores, {runs[0]['meta']['platform']}; jax "
           f"{runs[0]['meta']['jax']}, optax {runs[0]['meta']['optax']}. "
           "Commands: " + ", ".join(f"`{r['command']}`" for r in runs)
           + ". Medians over the runs of each run's medians and ratios; the "
           "0.15 target is for the grassmann (tracking) rows only; the last "
           "column divides by galore's fastest SVD step over all runs (the "
           "SVD's time on a loaded machine varies by 10x or more). "
           "*floor / galore amortized* is the best amortized ratio any "
           "method could reach (a step of the two projection matmuls "
           "alone, with a free subspace update).", ""]
  sizes = [res["model"]["name"] for res in runs[0]["sizes"]]
  lim = dict(TARGETS)
  for size in sizes:
    per_run = [next(res for res in r["sizes"] if res["model"]["name"] == size)
               for r in runs]
    m = per_run[0]["model"]
    lines += [f"## {size} (h={m['hidden']}, I={m['intermediate']}, rank "
              f"{m['rank']}; {per_run[0]['measured_blocks']} block measured)",
              "",
              "galore regular / floor = " + format(statistics.median(
                  res["ratios"]["galore/floor"] for res in per_run), ".3f")
              + "; floor / galore amortized = " + (format(statistics.median(
                  res["ratios"]["floor/galore_amortized"] for res in per_run),
                  ".3f") if all("floor/galore_amortized" in res["ratios"]
                                for res in per_run) else "n/a"),
              "",
              "| method | regular ms | update ms | regular / galore | "
              "regular / floor | update / galore | amortized / galore | "
              "update / fastest galore SVD step | state = spec |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in per_run[0]["rows"]:
      med_of = lambda get: statistics.median(get(res) for res in per_run)
      reg = med_of(lambda res: res["rows"][name]["regular_ms"])
      upd = med_of(lambda res: res["rows"][name]["update_ms"])
      cells = []
      for key, _ in TARGETS:
        if name in per_run[0]["ratios"]:
          v = med_of(lambda res: res["ratios"][name][key])
          cells.append(f"{v:.3f}" + ("" if v <= lim[key]
                                     or not _applies(name, key)
                                     else " (miss)"))
        else:
          cells.append("")
      if name in per_run[0]["ratios"]:
        fastest = min(min(res["rows"]["galore"]["update_samples_ms"])
                      for res in per_run)
        cells.append(f"{med_of(lambda res: res['rows'][name]['update_ms']) / fastest:.3f}")
      else:
        cells.append("")
      spec = (all(res["ratios"][name]["state_bytes_equal_spec"]
                  for res in per_run) if name in per_run[0]["ratios"] else "")
      lines.append(f"| {name} | {reg:.2f} | {upd:.1f} | " + " | ".join(cells)
                   + f" | {spec} |")
    lines.append("")
  text = "\n".join(lines)
  if out_md:
    with open(out_md, "w") as f:
      f.write(text)
  return text


def main(argv=None):
  if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--summarize":
    print(summarize(sys.argv[2:-1], sys.argv[-1]))
    return None
  args = parse_args(argv)
  sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
  gpu = jax.default_backend() == "gpu"
  meta = machine()
  command = "python " + " ".join([os.path.relpath(__file__)] +
                                 (sys.argv[1:] if argv is None else argv))
  print(f"{command}\n{meta}", flush=True)
  results = {"meta": meta, "command": command, "sizes": []}
  for s in sizes:
    if s not in MODELS:
      args.error(f"unknown size {s!r}")
    if s in GPU_ONLY and not gpu:
      print(f"\n== {s}: skipped (GPU only; backend is "
            f"{jax.default_backend()})")
      results.setdefault("skipped", []).append(s)
      continue
    results["sizes"].append(run_size(MODELS[s], args))
  if not (args.quick or args.no_stagger):
    print("\n== stagger", flush=True)
    results["stagger"] = stagger_window(MODELS[args.stagger_size],
                                        args.stagger_layers, 8,
                                        args.stagger_repeats)
    for key in ("off", "on"):
      v = results["stagger"][key]
      print(f"   stagger {key}: max/median = {v['max_over_median']:.2f}  "
            f"steps ms: " + " ".join(f"{x:.0f}" for x in v["step_ms"]))
  tag = args.tag or jax.default_backend()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"step_time_{tag}.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, f"step_time_{tag}.md"), "w") as f:
    f.write(markdown(results, meta, command))
  print(f"\nwrote {args.out}/step_time_{tag}.json and .md")
  return results


if __name__ == "__main__":
  main()
