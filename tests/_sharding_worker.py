"""Multi-device checks of subtrack on simulated CPU devices.

Run by tests/test_sharding.py in a subprocess (the device count must be set
before jax is imported). Prints one JSON object on its last stdout line:
measurements per (mesh, mode) case, for the test to assert on.

Usage: python tests/_sharding_worker.py [case ...]   (default: all cases)
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import subtrack_optax as st  # pylint: disable=g-import-not-at-top,wrong-import-position

RANK = 4
STEPS = 5  # update_interval=2: subspace init at t=0, refreshes at t=2, t=4
SHAPES = {
    "tall": (128, 64),      # 2-D, basis on the output side
    "scan": (3, 64, 128),   # scanned layers (L, m, n), basis on the input side
    "attn": (64, 4, 32),    # attention kernel (embed, heads, head_dim)
    "b": (128,),            # dense
}
DNUMS = {
    "tall": st.SubTrackDimensionNumbers(0, 1),
    "scan": st.SubTrackDimensionNumbers(1, 2),
    "attn": st.SubTrackDimensionNumbers(0, (1, 2)),
    "b": None,
}
# Smallest projected matrix (one batch slice): 64 x 128.
MATRIX_ELEMS = 64 * 128

MESHES = {
    "fsdp": ((2,), ("fsdp",), {
        "tall": P("fsdp", None),
        "scan": P(None, "fsdp", None), "attn": P("fsdp", None, None),
        "b": P("fsdp")}),
    "tp": ((2,), ("model",), {
        "tall": P("model", None),
        "scan": P(None, None, "model"), "attn": P(None, "model", None),
        "b": P("model")}),
    "dp_tp": ((2, 2), ("data", "model"), {
        "tall": P("model", "data"),
        "scan": P(None, "data", "model"), "attn": P("data", "model", None),
        "b": P("model")}),
}
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
LAPACK = re.compile(r"lapack|eigh|syevd|geqrf|orgqr|qr|svd|gesdd|potrf|"
                    r"cholesky|getrf|trsm", re.IGNORECASE)


def make_tx():
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      st.subtrack(rank=RANK, update_interval=2, dimension_numbers=DNUMS),
      optax.trace(decay=0.5),  # another transform with params-shaped state
      optax.scale(-0.1),
  )


def host_data():
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(s).astype(np.float32)
            for k, s in SHAPES.items()}
  grads = []
  for _ in range(STEPS):
    # Low-rank-ish gradients plus noise, so the subspace is well defined.
    g = {}
    for k, s in SHAPES.items():
      x = rng.standard_normal(s).astype(np.float32)
      if len(s) >= 2:
        flat = x.reshape(s[0], -1) if k == "attn" else x
        u = rng.standard_normal(flat.shape[:-1] + (RANK,))
        u = u * np.arange(RANK, 0, -1)  # decaying singular values 4, 3, 2, 1
        v = rng.standard_normal(flat.shape[:-2] + (RANK, flat.shape[-1]))
        x = (0.3 * flat + u @ v).astype(np.float32).reshape(s)
      g[k] = x
    grads.append(g)
  return params, grads


def single_device_reference(params, grads):
  tx = make_tx()
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update).lower(grads[0], state, params).compile()
  outs = []
  for g in grads:
    u, state = update(g, state, params)
    outs.append(jax.tree.map(np.asarray, u))
  return outs, update.as_text()


def collective_sizes(hlo: str):
  """(op, largest array elements in its result) for each collective."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) +
                  r")(?:-start|-done)?\(", line)
    if not m:
      continue
    shapes = re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))
    elems = [int(np.prod([int(d) for d in s.split(",") if d] or [1]))
             for s in shapes]
    found.append((m.group(2), max(elems or [0])))
  return found


def custom_calls(hlo: str):
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def norm_spec(spec, ndim):
  out = []
  for e in tuple(spec) + (None,) * (ndim - len(spec)):
    out.append(() if e is None else (e,) if isinstance(e, str) else tuple(e))
  return out


def state_bytes(state):
  """(total bytes, largest per-device bytes) of a sharded state."""
  total = 0
  per_device = {}
  for leaf in jax.tree.leaves(state):
    total += leaf.size * leaf.dtype.itemsize
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = (per_device.get(shard.device.id, 0) +
                                     shard.data.size * leaf.dtype.itemsize)
  return total, max(per_device.values())


def run_case(name, mode, params_h, grads_h, ref):
  shape, axes, pspecs = MESHES[name]
  n_dev = int(np.prod(shape))
  mesh = jax.make_mesh(shape, axes, axis_types=(MODES[mode],) * len(axes),
                       devices=jax.devices()[:n_dev])
  tx = make_tx()
  res = {"devices": n_dev}
  with jax.set_mesh(mesh):
    shard = lambda t: jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)
    params = shard(params_h)
    specs = st.partition_specs(tx, params, pspecs)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), pspecs,
                                   is_leaf=lambda x: isinstance(x, P))
    if mode == "explicit":
      init = jax.jit(tx.init)
      update = jax.jit(tx.update)
    else:
      init = jax.jit(tx.init, out_shardings=shardings)
      update = jax.jit(tx.update, out_shardings=(param_shardings, shardings))
    state = init(params)
    # Compile once; the compiled update is both run and inspected.
    update = update.lower(shard(grads_h[0]), state, params).compile()

    # The state's layout is the partition_specs layout.
    got = jax.tree.map(lambda x: x.sharding.spec, state)
    mismatches = []
    for (path, want), g, leaf in zip(
        jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, P))[0],
        jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P)),
        jax.tree.leaves(state)):
      if norm_spec(want, leaf.ndim) != norm_spec(g, leaf.ndim):
        mismatches.append(f"{jax.tree_util.keystr(path)}: want {want} got {g}")
    res["init_spec_mismatches"] = mismatches
    res["structure_equal"] = (
        jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) ==
        jax.tree.structure(state))
    total, per_dev = state_bytes(state)
    sub_total, sub_per_dev = state_bytes(state[1])
    res["state_bytes"] = [total, per_dev]
    res["subtrack_state_bytes"] = [sub_total, sub_per_dev]

    errs = []
    for g_h, u_ref in zip(grads_h, ref):
      u, state = update(shard(g_h), state, params)
      errs.append({k: float(np.linalg.norm(np.asarray(u[k]) - u_ref[k]) /
                            np.linalg.norm(u_ref[k])) for k in u_ref})
    res["rel_err"] = errs
    res["max_rel_err"] = max(max(e.values()) for e in errs)
    res["state_spec_after_update"] = [
        str(x) for x in jax.tree.leaves(jax.tree.map(
            lambda x, s: None if norm_spec(x.sharding.spec, x.ndim) ==
            norm_spec(s, x.ndim) else f"{x.sharding.spec} != {s}",
            state, specs, is_leaf=lambda x: isinstance(x, P)))]
    text = update.as_text()
  res["collectives"] = collective_sizes(text)
  res["largest_collective"] = max([e for _, e in res["collectives"]] or [0])
  res["custom_calls"] = custom_calls(text)
  return res


def explicit_variants():
  """Traces the update in Explicit mode for the other options.

  Tracing is where explicit sharding is type-checked (ShardingTypeError), so
  this covers every subspace mode without compiling. Returns, per variant,
  "ok" when the new state has the old state's types (shape, dtype and
  sharding) and the update the gradient's, else the error.
  """
  shape, axes, pspecs = MESHES["dp_tp"]
  mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * 2)
  variants = {
      "svd": dict(subspace_update="svd"),
      "random": dict(subspace_update="random"),
      "frozen": dict(subspace_update="frozen"),
      "stagger": dict(stagger=True),
      "basis_large": dict(basis_side="large"),
      "no_recovery_no_transport": dict(recovery_scaling=False,
                                       transport_moments=False),
      "bf16_state": dict(mu_dtype=jnp.bfloat16, basis_dtype=jnp.bfloat16),
      # head_dim sharded: (heads, head_dim) merges as a re-layout.
      "attn_head_dim_sharded": dict(specs={"attn": P("data", None, "model")}),
      "rank_not_divisible": dict(rank=3),
  }
  out = {}
  with jax.set_mesh(mesh):
    for name, kw in variants.items():
      specs = {**pspecs, **kw.pop("specs", {})}
      params = jax.tree.map(
          lambda x, sp: jax.device_put(jnp.zeros(x), NamedSharding(mesh, sp)),
          SHAPES, specs, is_leaf=lambda x: isinstance(x, tuple))
      kw = {"rank": RANK, **kw}
      tx = st.subtrack(update_interval=2, dimension_numbers=DNUMS, **kw)
      try:
        state = jax.jit(tx.init)(params)
        want = st.partition_specs(tx, params, specs)
        if jax.tree.leaves(jax.tree.map(
            lambda x, w: None if norm_spec(x.sharding.spec, x.ndim) ==
            norm_spec(w, x.ndim) else 1, state, want,
            is_leaf=lambda x: isinstance(x, P))):
          raise ValueError("init layout is not partition_specs")
        u, new = jax.jit(tx.update).trace(params, state, params).out_info
        same = lambda a, b: (a.shape == b.shape and a.dtype == b.dtype and
                             norm_spec(a.sharding.spec, len(a.shape)) ==
                             norm_spec(b.sharding.spec, len(b.shape)))
        ok = all(jax.tree.leaves(jax.tree.map(same, state, new)))
        ok &= all(jax.tree.leaves(jax.tree.map(same, params, u)))
        out[name] = "ok" if ok else "state or update types changed"
      except Exception as e:  # pylint: disable=broad-except
        out[name] = f"{type(e).__name__}: {str(e)[:300]}"
  return out


def explicit_temps_by_depth(depths=(2, 8)):
  """Temporaries of the compiled update in Explicit mode for trees of
  ``n`` same-shape leaves (FSDP on 4 devices, the basis's ``r`` axis
  sharded): ``{n: temp bytes}`` and one leaf's gathered basis in bytes."""
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:4])
  d, big_d, rank = 64, 256, 16
  out = {}
  with jax.set_mesh(mesh):
    for n in depths:
      params = {f"w{i}": jax.device_put(
          jnp.zeros((d, big_d)), NamedSharding(mesh, P(None, "data")))
                for i in range(n)}
      tx = st.subtrack(rank=rank, update_interval=2)
      state = jax.jit(tx.init)(params)
      compiled = jax.jit(tx.update, donate_argnums=1).lower(
          params, state, params).compile()
      out[n] = compiled.memory_analysis().temp_size_in_bytes
  return {"temps": out, "gathered_basis_bytes": d * rank * 4}


def controls():
  """Positive controls: the detectors do see a LAPACK call / a big gather."""
  eigh = jax.jit(jnp.linalg.eigh).lower(jnp.eye(4)).compile().as_text()
  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  x = jax.device_put(jnp.zeros((64, 128)),
                     NamedSharding(mesh, P("data", "model")))
  gather = jax.jit(lambda x: x * 2.0,
                   out_shardings=NamedSharding(mesh, P())).lower(x)
  return {"eigh_custom_calls": custom_calls(eigh),
          "gather_collectives": collective_sizes(gather.compile().as_text())}


def main(argv):
  cases = argv or [f"{m}:{mode}" for m in MESHES for mode in MODES]
  t0 = time.time()
  params_h, grads_h = host_data()
  ref, ref_text = single_device_reference(params_h, grads_h)
  out = {"matrix_elems": MATRIX_ELEMS,
         "single_device_custom_calls": custom_calls(ref_text),
         "cases": {}}
  out["controls"] = controls()
  out["explicit_variants"] = explicit_variants()
  out["explicit_temps"] = explicit_temps_by_depth()
  print("controls and variants done", round(time.time() - t0, 1),
        flush=True, file=sys.stderr)
  for case in cases:
    name, mode = case.split(":")
    out["cases"][case] = run_case(name, mode, params_h, grads_h, ref)
    print(case, "done", round(time.time() - t0, 1), flush=True,
          file=sys.stderr)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
