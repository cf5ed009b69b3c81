"""Writes a SubTrack state with the pre-refactor code (pickle + orbax).

Run from a checkout of main dd69138 (before the state carried its plans),
with the test suite's XLA flags so that the recorded next update is the one
the tests' compiled program computes:

  XLA_FLAGS=--xla_backend_optimization_level=0 JAX_PLATFORMS=cpu \
    PYTHONPATH=<old checkout> python make_v0.1.0_state.py tests/data
"""
import os, pickle, sys
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
import subtrack_optax as st
out = sys.argv[1]
params = {"w": jnp.zeros((3, 20, 16)), "q": jnp.zeros((16, 2, 12)), "b": jnp.zeros((16,))}
dims = {"w": st.SubTrackDimensionNumbers(-2, -1), "q": st.SubTrackDimensionNumbers(0, (1, 2)), "b": None}
tx = optax.chain(optax.clip_by_global_norm(1.0), st.subtrack(4, 2, dimension_numbers=dims, basis_dtype=jnp.bfloat16))
state = tx.init(params)
upd = jax.jit(tx.update)
for t in range(3):
  g = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(7), t), p.shape), params)
  _, state = upd(g, state, params)
state = jax.device_get(state)
with open(os.path.join(out, "state_v0.1.0.pkl"), "wb") as f:
  pickle.dump(state, f)
ckpt = ocp.StandardCheckpointer()
ckpt.save(os.path.abspath(os.path.join(out, "state_v0.1.0_orbax")), state)
ckpt.wait_until_finished()
print("ok", jax.tree.structure(state))
g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(99), p.shape), params)
u, s2 = upd(g, state, params)
flat = {f"u{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(u))}
flat.update({f"s{i}": np.asarray(x.astype(jnp.float32)) for i, x in enumerate(jax.tree.leaves(s2))})
np.savez(os.path.join(out, "state_v0.1.0_next_update.npz"), **flat)
