"""The state carries its leaf plans; checkpoints from before that restore.

``tests/data/state_v0.1.0*`` were written by ``make_v0.1.0_state.py`` with
the code before the state carried its plans (main dd69138): a pickle, an
orbax checkpoint, and the update that code computed next from that state.
"""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import subtrack_optax as st

DATA = os.path.join(os.path.dirname(__file__), "data")
PARAMS = {"w": jnp.zeros((3, 20, 16)), "q": jnp.zeros((16, 2, 12)),
          "b": jnp.zeros((16,))}
DIMS = {"w": st.SubTrackDimensionNumbers(-2, -1),
        "q": st.SubTrackDimensionNumbers(0, (1, 2)), "b": None}
TX = optax.chain(optax.clip_by_global_norm(1.0),
                 st.subtrack(4, 2, dimension_numbers=DIMS,
                             basis_dtype=jnp.bfloat16))
UPDATE = jax.jit(TX.update)


def _next_grads():
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(99), p.shape), PARAMS)


def _check_next_update(state):
  """The update from ``state`` equals the old code's, bit for bit."""
  want = np.load(os.path.join(DATA, "state_v0.1.0_next_update.npz"))
  u, s2 = UPDATE(_next_grads(), state, PARAMS)
  for i, x in enumerate(jax.tree.leaves(u)):
    np.testing.assert_array_equal(np.asarray(x), want[f"u{i}"])
  for i, x in enumerate(jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                  want[f"s{i}"])


def test_state_carries_plans_as_static_metadata():
  state = TX.init(PARAMS)[1]
  assert state.plans is not None and state.plans.rank == 4
  plans = state.plans.tree()
  assert plans["q"].projected and plans["q"].output_axes == (1, 2)
  assert not plans["b"].projected
  # Not leaves: the leaves and key paths are the five fields'.
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert paths[0] == ".count" and all(
      p.split("[")[0] in (".count", ".mu", ".nu", ".basis", ".recovery_norm")
      for p in paths)
  assert len(jax.tree.leaves(state)) == 1 + 3 + 3 + 2 + 2


def test_plans_survive_jit_eval_shape_tree_map_pickle_and_replace():
  state = TX.init(PARAMS)
  _, after = UPDATE(_next_grads(), state, PARAMS)
  plans = state[1].plans
  assert after[1].plans == plans
  assert jax.eval_shape(TX.init, PARAMS)[1].plans == plans
  assert jax.tree.map(lambda x: x, state)[1].plans == plans
  assert pickle.loads(pickle.dumps(state))[1].plans == plans
  assert state[1]._replace(count=jnp.int32(5)).plans == plans
  # The state can be carried by a lax loop (same treedef in and out).
  out = jax.lax.fori_loop(
      0, 2, lambda i, s: TX.update(_next_grads(), s, PARAMS)[1], state)
  assert int(out[1].count) == 2


def test_different_configurations_have_different_treedefs():
  a = st.subtrack(4).init(PARAMS)
  b = st.subtrack(4, basis_side="large").init(PARAMS)
  assert jax.tree.structure(a) != jax.tree.structure(b)
  assert jax.tree.structure(a) == jax.tree.structure(st.subtrack(4).init(
      PARAMS))


def test_pickle_from_before_the_plans_restores_and_continues():
  with open(os.path.join(DATA, "state_v0.1.0.pkl"), "rb") as f:
    state = pickle.load(f)
  assert isinstance(state[1], st.SubTrackState)
  assert state[1].plans is None   # written before the state carried them
  assert int(state[1].count) == 3
  _check_next_update(jax.device_put(state))


def test_orbax_checkpoint_from_before_the_plans_restores_and_continues():
  target = jax.eval_shape(TX.init, PARAMS)
  state = ocp.StandardCheckpointer().restore(
      os.path.join(DATA, "state_v0.1.0_orbax"), target)
  assert state[1].plans == TX.init(PARAMS)[1].plans
  assert int(state[1].count) == 3
  _check_next_update(state)


def test_diagnostics_read_the_plans_from_the_state():
  state = TX.init(PARAMS)
  grads = _next_grads()
  _, after = UPDATE(grads, state, PARAMS)
  got = st.subspace_diagnostics(grads, after, state)
  assert sorted(got) == ["['q']", "['w']"]
  assert got["['w']"].captured_energy.shape == (3,)
  # The old call, with the options repeated, gives the same numbers.
  old = st.subspace_diagnostics(grads, after, state, dimension_numbers=DIMS)
  for k in got:
    np.testing.assert_array_equal(got[k].captured_energy,
                                  old[k].captured_energy)


def test_diagnostics_of_a_state_without_plans_need_the_options():
  with open(os.path.join(DATA, "state_v0.1.0.pkl"), "rb") as f:
    state = pickle.load(f)
  grads = _next_grads()
  with pytest.raises(ValueError, match="resolves to"):
    st.subspace_diagnostics(grads, state)   # default rule: q is not (16, 2, 12)
  got = st.subspace_diagnostics(grads, state, dimension_numbers=DIMS)
  assert sorted(got) == ["['q']", "['w']"]


def test_diagnostics_reject_options_that_contradict_the_state():
  params = {"w": jnp.zeros((16, 16))}
  state = st.subtrack(4, dimension_numbers=st.SubTrackDimensionNumbers(
      -1, -2)).init(params)
  with pytest.raises(ValueError, match="do not match"):
    st.subspace_diagnostics(params, state,
                            dimension_numbers=st.SubTrackDimensionNumbers(
                                -2, -1))
