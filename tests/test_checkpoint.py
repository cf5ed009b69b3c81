"""Checkpointing: the full optimizer state round-trips and resumes exactly.

Issue 6, item 4. The state holds ``optax.MaskedNode()`` leaves (dense
leaves' bases and limiter norms), bfloat16 bases and first moments, an int32
count and the states of the other transforms in the chain. A run that is
saved, restored and continued must equal the uninterrupted run bit for bit
(same compiled step, same inputs, CPU).
"""

import os
import pickle
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import subtrack_optax as st
from tests import _monitor

BEFORE, AFTER = 3, 3  # update_interval=2: refreshes at counts 2 and 4


def _make_tx():
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      st.subtrack_adamw(
          optax.linear_schedule(1e-2, 1e-3, 10), rank=4, update_interval=2,
          weight_decay=1e-3, basis_dtype=jnp.bfloat16, mu_dtype=jnp.bfloat16),
  )


TX = _make_tx()


def _init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "w": jax.random.normal(k1, (3, 20, 16), jnp.float32),  # projected
      "b": jax.random.normal(k2, (16,), jnp.bfloat16),       # dense
  }


def _loss(params, step):
  key = jax.random.fold_in(jax.random.key(1), step)
  target = jax.random.normal(key, (3, 20, 16))
  w = params["w"] + params["b"].astype(jnp.float32)
  return jnp.mean((w - target) ** 2 * jnp.arange(1.0, 17.0))


@jax.jit
def _train_step(params, opt_state, step):
  grads = jax.grad(_loss)(params, step)
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _train(params, opt_state, start, n):
  for step in range(start, start + n):
    params, opt_state = _train_step(params, opt_state, jnp.int32(step))
  return params, opt_state


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _on_device(tree):
  # Committed arrays, like those orbax restores: one compiled step serves
  # the original and the restored runs.
  return jax.device_put(tree, jax.devices()[0])


@pytest.fixture(scope="module")
def runs():
  params = _on_device(_init_params())
  opt_state = _on_device(TX.init(params))
  full = _train(params, opt_state, 0, BEFORE + AFTER)
  half = _train(params, opt_state, 0, BEFORE)
  return full, half


def _subtrack_state(opt_state):
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, st.SubTrackState))
           if isinstance(s, st.SubTrackState)]
  assert len(found) == 1
  return found[0]


def test_state_has_masked_and_low_precision_leaves(runs):
  _, (_, opt_state) = runs
  sub = _subtrack_state(opt_state)
  assert isinstance(sub.basis["b"], optax.MaskedNode)
  assert isinstance(sub.recovery_norm["b"], optax.MaskedNode)
  assert sub.basis["w"].dtype == jnp.bfloat16
  assert sub.mu["w"].dtype == jnp.bfloat16
  assert int(sub.count) == BEFORE


def test_orbax_roundtrip_resumes_bit_for_bit(runs, tmp_path):
  (full_params, full_state), (params, opt_state) = runs
  path = tmp_path / "ckpt"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, {"params": params, "opt_state": opt_state})
  ckptr.wait_until_finished()
  # Restore the way a new job does: from shapes only.
  abstract = jax.eval_shape(
      lambda: {"params": _init_params(), "opt_state": TX.init(_init_params())})
  restored = ckptr.restore(path, abstract)
  ckptr.close()
  _assert_bitwise_equal(restored["params"], params)
  _assert_bitwise_equal(restored["opt_state"], opt_state)
  sub = _subtrack_state(restored["opt_state"])
  assert isinstance(sub, st.SubTrackState)
  assert isinstance(sub.basis["b"], optax.MaskedNode)
  resumed = _train(restored["params"], restored["opt_state"], BEFORE, AFTER)
  _assert_bitwise_equal(resumed, (full_params, full_state))


def test_pickle_of_host_copies_resumes_bit_for_bit(runs):
  (full_params, full_state), (params, opt_state) = runs
  blob = pickle.dumps(jax.device_get((params, opt_state)))
  host_params, host_state = pickle.loads(blob)
  assert all(isinstance(x, (np.ndarray, np.generic))
             for x in jax.tree.leaves(host_state))
  restored = _on_device((host_params, host_state))
  _assert_bitwise_equal(restored, (params, opt_state))
  resumed = _train(*restored, BEFORE, AFTER)
  _assert_bitwise_equal(resumed, (full_params, full_state))


def test_restored_state_refreshes_like_the_original(runs):
  # The resumed steps include a subspace refresh (count 4): the basis moved.
  (_, full_state), (_, opt_state) = runs
  before = _subtrack_state(opt_state).basis["w"]
  after = _subtrack_state(full_state).basis["w"]
  assert not np.array_equal(np.asarray(before), np.asarray(after))


# A 2-device simulated mesh needs the device count before jax is imported:
# run in a fresh interpreter.
_SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import subtrack_optax as st

    path = sys.argv[1]
    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     st.subtrack(4, 2, basis_dtype=jnp.bfloat16),
                     optax.scale(-1e-2))
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (3, 20, 16)),
              "b": jax.random.normal(k2, (16,))}
    param_specs = {"w": P(None, "x", None), "b": P("x")}

    def fallback(x):  # shard the first even axis, replicate the rest
      for i, n in enumerate(x.shape):
        if n % 2 == 0:
          return P(*([None] * i + ["x"]))
      return P()

    state_shape = jax.eval_shape(tx.init, params)
    if hasattr(st, "partition_specs"):
      state_specs = st.partition_specs(tx, params, param_specs)
    else:
      state_specs = jax.tree.map(fallback, state_shape)
    named = lambda specs: jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs,
        is_leaf=lambda s: isinstance(s, P))
    p_sh, s_sh = named(param_specs), named(state_specs)

    def loss(p, step):
      t = jax.random.normal(jax.random.fold_in(jax.random.key(1), step),
                            (3, 20, 16))
      return jnp.mean((p["w"] + p["b"] - t) ** 2)

    @jax.jit
    def step_fn(p, s, step):
      g = jax.grad(loss)(p, step)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (jax.lax.with_sharding_constraint(p, p_sh),
              jax.lax.with_sharding_constraint(s, s_sh))

    params = jax.device_put(params, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    for i in range(3):
      params, state = step_fn(params, state, i)
    w_basis = state[1].basis["w"]
    assert len(w_basis.sharding.device_set) == 2
    sharded = [x for x in jax.tree.leaves(state)
               if x.addressable_shards[0].data.shape != x.shape]
    assert sharded, "no state leaf is sharded"

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, {"params": params, "state": state})
    ckptr.wait_until_finished()
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        {"params": params, "state": state}, {"params": p_sh, "state": s_sh})
    restored = ckptr.restore(path, abstract)
    ckptr.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(
        {"params": params, "state": state})):
      assert a.dtype == b.dtype and a.shape == b.shape
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding,
                                                               b.sharding)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(restored["state"][1].basis["b"], optax.MaskedNode)

    p1, s1 = params, state
    p2, s2 = restored["params"], restored["state"]
    for i in range(3, 6):
      p1, s1 = step_fn(p1, s1, i)
      p2, s2 = step_fn(p2, s2, i)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(bool(jnp.all(jnp.isfinite(x)))
               for x in jax.tree.leaves(p1))
    print("SHARDED_OK", len(sharded))
""")


def test_sharded_orbax_roundtrip_on_two_devices(tmp_path):
  env = dict(os.environ)  # the script appends the device count to XLA_FLAGS
  proc = _monitor.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path / "sharded")],
      env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "SHARDED_OK" in proc.stdout
