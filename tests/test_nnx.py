"""Flax NNX: ``nnx.Optimizer`` with subtrack on sharded parameters, no helper.

The parameters carry sharding annotations (``nnx.with_partitioning``);
NNX shards each optimizer-state variable with the metadata ``tx.init``
gives it. The state must come out in the ``partition_specs`` layout (issue
13, item 4). In-process on a one-device mesh (NNX's sharding rank checks
apply there too), and in a subprocess (tests/_nnx_worker.py) on 2- and
4-device simulated meshes under ``nnx.jit`` (Auto axes on both, Explicit
axes on 4).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import subtrack_optax as st
from tests import _monitor

WORKER = pathlib.Path(__file__).with_name("_nnx_worker.py")
is_spec = lambda x: isinstance(x, P)


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    shard = nnx.with_partitioning
    self.lin = nnx.Linear(
        16, 32, rngs=rngs,
        kernel_init=shard(nnx.initializers.lecun_normal(), ("data", "model")),
        bias_init=shard(nnx.initializers.zeros_init(), ("model",)))
    self.scan = nnx.Param(shard(nnx.initializers.lecun_normal(),
                                (None, "model", "data"))(
                                    rngs.params(), (2, 32, 16)))

  def __call__(self, x):
    h = self.lin(x)
    for layer in range(2):
      h = jnp.tanh(h @ self.scan[layer]) @ self.scan[layer].T
    return h


@pytest.fixture
def one_device_mesh():
  mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    yield mesh


def test_nnx_optimizer_state_has_partition_specs(one_device_mesh):
  del one_device_mesh
  model = _Tiny(nnx.Rngs(0))
  tx = st.subtrack_adamw(1e-2, rank=4, update_interval=2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  want = st.partition_specs(tx, nnx.as_pure(params),
                            nnx.as_pure(nnx.get_partition_spec(params)))
  got = nnx.as_pure(nnx.get_partition_spec(optimizer.opt_state))
  got, want = (jax.tree.leaves(t, is_leaf=is_spec) for t in (got, want))
  assert [tuple(s) for s in got] == [tuple(s) for s in want]
  sub = optimizer.opt_state[0]
  assert sub.basis["lin"]["kernel"].shape == (16, 4)
  assert tuple(nnx.get_partition_spec(sub.recovery_norm)["lin"]["kernel"]
               .get_value()) == ()
  assert tuple(nnx.get_partition_spec(sub.mu)["scan"].get_value()) == (
      None, "data", "model")


def test_nnx_optimizer_trains_under_nnx_jit(one_device_mesh):
  del one_device_mesh
  model = _Tiny(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, st.subtrack_adamw(3e-2, rank=4,
                                                     update_interval=2),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 16))
  y = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (16, 32)))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(6)]
  assert losses[-1] < losses[0], losses
  assert int(optimizer.opt_state[0].count[...]) == 6


def test_unboxed_init_is_unchanged():
  """Plain-array parameters give plain-array state (no Variable anywhere)."""
  params = {"w": jnp.ones((16, 32)), "b": jnp.zeros((32,))}
  state = st.subtrack(rank=4).init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  boxed = st.subtrack(rank=4).init(
      {"w": nnx.Param(params["w"]), "b": nnx.Param(params["b"])})
  assert [x.shape for x in jax.tree.leaves(nnx.as_pure(boxed))] == [
      x.shape for x in jax.tree.leaves(state)]


# ------------------------------------------- multi-device (subprocess) --


@pytest.fixture(scope="module")
def report():
  return _monitor.worker_report(WORKER)


CASES = ["2:auto", "4:auto", "4:explicit"]


@pytest.mark.parametrize("case", CASES)
def test_reported_specs_are_partition_specs(report, case):
  r = report[case]
  assert r["reported"] == r["want"]


def _param_of(path: str) -> str:
  """``"[0].mu['thin']"`` -> ``"['thin']"``: the parameter a state leaf is of."""
  return re.sub(r"^\[\d+\]\.\w+", "", path)


@pytest.mark.parametrize("case", CASES)
def test_state_arrays_laid_out_as_partition_specs(report, case):
  r = report[case]
  assert r["init"] == []
  # After training under nnx.jit, Auto axes let GSPMD re-lay out a state
  # leaf; allowed only where it does the same to optax.adamw's moments.
  if case.endswith("explicit"):
    assert r["trained"] == []
  else:
    moved = {_param_of(p) for p, _, _ in r["trained"]}
    assert moved <= {_param_of(p) for p, _, _ in r["adamw_trained"]}, r


@pytest.mark.parametrize("case", CASES)
def test_sharded_losses_match_one_device(report, case):
  ref, got = report["1:auto"]["losses"], report[case]["losses"]
  assert len(got) == 5
  assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) <= 1e-4
  assert got[-1] < got[0]


@pytest.mark.parametrize("case", CASES)
def test_state_bytes_split_over_devices(report, case):
  devices = int(case.split(":")[0])
  r = report[case]
  assert r["device0_bytes"] <= 1.2 * r["bytes"] / devices
