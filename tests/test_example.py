"""Tests of examples/pretrain_llama.py (run in-process to share compiles)."""

import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import _cli  # noqa: E402
import _data  # noqa: E402
import _llama  # noqa: E402
import pretrain_llama  # noqa: E402

import subtrack_optax as st  # noqa: E402
from tests import _monitor  # noqa: E402

# Every in-process run uses this one configuration, so the training step is
# compiled once for the whole file. update-interval 3 puts subspace updates at
# steps 3 and 6, on both sides of the resume point 4.
STEPS = 8
BASE = ["--config", "tiny", "--steps", str(STEPS), "--update-interval", "3",
        "--eval-batches", "2", "--log-every", "4", "--no-progress"]


def _equal_trees(a, b):
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))
  return bool(leaves) and all(leaves)


def test_tiny_run_logs_and_prints_eval_loss(tmp_path, capsys):
  out = pretrain_llama.main(BASE + ["--out-dir", str(tmp_path)])
  printed = capsys.readouterr().out
  lines = printed.strip().splitlines()
  # The leaf table (st.list_leaves): every leaf, how it is handled and why.
  assert "14 of 21 leaves projected" in printed
  assert "['embed']['embedding']" in printed
  assert "dense: dimension_numbers" in printed
  assert "eval loss" in lines[-1]
  assert f"{out['eval_loss']:.4f}" in lines[-1]
  # It learned something: below the loss of a uniform byte distribution.
  assert out["eval_loss"] < math.log(256)
  assert len(out["losses"]) == STEPS
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  kinds = [r["type"] for r in records]
  assert kinds[0] == "config" and kinds[-1] == "summary"
  train = [r for r in records if r["type"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  assert all(math.isfinite(r["loss"]) for r in train)
  assert train[0]["lr"] == 0.0 and train[-1]["lr"] > 0.0     # warmup from 0
  # Diagnostics: attention and MLP kernels only, energies in [0, 1], and a
  # rotation angle after the grassmann updates.
  logged = train[-1]["captured_energy"]
  assert len(logged) == 7 * _llama.CONFIGS["tiny"].layers
  assert all(k.split(".")[-1] in ("q", "k", "v", "o", "gate", "up", "down")
             for k in logged)
  assert all(0.0 < v <= 1.0 for v in logged.values())
  angles = train[-1]["rotation_angle"]
  assert angles and all(0.0 < v <= 0.5 + 1e-5 for v in angles.values())
  with open(tmp_path / "loss.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_step_is_compiled_before_the_parameters_exist(monkeypatch):
  """The compiler's working set comes and goes before the parameters and
  the optimizer state are allocated (the example's peak RSS is the larger
  of the two, not their sum), and the loop runs the compiled step."""
  events = []
  real_build, real_compiled_step = (pretrain_llama.build,
                                    pretrain_llama.Run.compiled_step)

  def build(*args):
    run = real_build(*args)
    init = lambda seed: (events.append("init"), run.init(seed))[1]
    return dataclasses.replace(run, init=init, compiled={})

  def compiled_step(run, *args):
    events.append("compile")
    step = real_compiled_step(run, *args)
    assert isinstance(step, jax.stages.Compiled)
    return step

  monkeypatch.setattr(pretrain_llama, "build", build)
  monkeypatch.setattr(pretrain_llama.Run, "compiled_step", compiled_step)
  out = pretrain_llama.main(BASE + ["--steps", "2"])
  assert events == ["compile", "init"]
  assert len(out["losses"]) == 2 and math.isfinite(out["eval_loss"])


def test_resumed_run_equals_uninterrupted(tmp_path):
  full = pretrain_llama.main(BASE)
  ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
  first = pretrain_llama.main(BASE + ckpt + ["--stop-after", "4"])
  assert first["steps"] == 4
  second = pretrain_llama.main(BASE + ckpt)
  assert second["start_step"] == 4 and second["steps"] == STEPS
  assert first["losses"] + second["losses"] == full["losses"]
  assert _equal_trees(second["params"], full["params"])
  assert _equal_trees(second["opt_state"], full["opt_state"])
  assert second["eval_loss"] == full["eval_loss"]


def test_data_path_file_and_folder(tmp_path, capsys):
  text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(800))
  path = tmp_path / "code.txt"
  path.write_text(text)
  corpus = _data.load_path(str(path))
  data = np.frombuffer(text.encode(), np.uint8)
  cut = int(len(data) * 0.95)
  np.testing.assert_array_equal(corpus.train, data[:cut])
  np.testing.assert_array_equal(corpus.eval, data[cut:])
  out = pretrain_llama.main(BASE + ["--data", str(path)])
  assert str(path) in capsys.readouterr().out
  assert math.isfinite(out["eval_loss"])
  # A folder: files in sorted order, split by path hash, NUL-separated.
  folder = tmp_path / "folder"
  folder.mkdir()
  for i in range(40):
    (folder / f"f{i:02d}.txt").write_text(f"file {i}\n" * 50)
  (folder / "binary.bin").write_bytes(b"\x00\x01" * 100)
  corpus = _data.load_path(str(folder))
  assert corpus.n_files == 40
  joined = bytes(corpus.train) + bytes(corpus.eval)
  assert b"\x01" not in joined and joined.count(b"\x00") == 40


def test_batches_depend_only_on_seed_and_step():
  tokens = np.arange(10_000, dtype=np.int64) % 256
  a = _data.train_batch(tokens, 7, 0, 4, 16)
  np.testing.assert_array_equal(a, _data.train_batch(tokens, 7, 0, 4, 16))
  assert a.shape == (4, 17) and a.dtype == np.int32
  assert not np.array_equal(a, _data.train_batch(tokens, 8, 0, 4, 16))
  assert not np.array_equal(a, _data.train_batch(tokens, 7, 1, 4, 16))
  ev = _data.eval_batches(tokens, 3, 4, 16)
  assert ev.shape == (3, 4, 17)


def test_default_corpus_split_is_disjoint_and_deterministic():
  c = _data.default_corpus(0.5)
  assert len(c.train) >= 500_000 and len(c.eval) > 0
  assert c.train.dtype == np.uint8
  files = _data._list_files(
      __import__("sysconfig").get_paths()["stdlib"], _data.TEXT_SUFFIXES,
      skip_dirs=("site-packages", "dist-packages"))
  assert not any(f.split(os.sep)[0] == "site-packages" for f in files)
  ev = [f for f in files if _data._is_eval(f)]
  assert 0 < len(ev) < len(files) / 5
  assert _data.default_corpus(0.5) is c     # cached per process


def test_projected_leaves_are_attention_and_mlp_kernels():
  cfg = _llama.CONFIGS["tiny"]
  params = jax.eval_shape(
      lambda: pretrain_llama.nnx.to_pure_dict(pretrain_llama.nnx.state(
          _llama.Llama(cfg, pretrain_llama.nnx.Rngs(0)))))
  dims = pretrain_llama._subtrack_dims(params)
  flat = jax.tree_util.tree_flatten_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(
          x, st.SubTrackDimensionNumbers))[0]
  projected = [jax.tree_util.keystr(p) for p, v in flat if v is not None]
  dense = [jax.tree_util.keystr(p) for p, v in flat if v is None]
  assert len(projected) == 7 * cfg.layers
  assert all("attn" in p or "mlp" in p for p in projected)
  assert any("embed" in p for p in dense) and any("head" in p for p in dense)
  assert all("norm" not in p for p in projected)
  assert _llama.count_params(cfg) == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(params))


ADAMW = BASE + ["--optimizer", "adamw", "--steps", "3"]


@pytest.fixture(scope="module")
def adamw_run():
  return pretrain_llama.main(ADAMW)


def test_other_optimizers_and_state_memory(adamw_run):
  galore = pretrain_llama.main(BASE + ["--optimizer", "galore", "--steps", "3"])
  for out in (adamw_run, galore):
    assert math.isfinite(out["eval_loss"]) and out["eval_loss"] < math.log(256)
    assert not out["captured_energy"]          # diagnostics: subtrack only
  adam_bytes = 2 * adamw_run["param_bytes"]    # mu and nu
  assert adamw_run["opt_state_bytes"] >= adam_bytes
  assert galore["opt_state_bytes"] < 0.6 * adam_bytes


def test_command_line_with_fsdp_mesh(tmp_path, adamw_run):
  """The script runs as a program, FSDP-sharded over 2 simulated devices,
  and matches the single-device in-process run."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py")]
  res = _monitor.run(cmd + ADAMW + ["--mesh", "auto"], env=env, cwd=tmp_path)
  assert res.returncode == 0, res.stderr[-2000:]
  last = res.stdout.strip().splitlines()[-1]
  assert "eval loss" in last
  loss = float(last.split("eval loss")[1].split()[0])
  np.testing.assert_allclose(loss, adamw_run["eval_loss"], atol=2e-4)
  # From the command line the run leaves its records in a default run
  # directory, and says where.
  runs = list((tmp_path / "runs").iterdir())
  assert len(runs) == 1 and runs[0].name.startswith("tiny-adamw-")
  assert {"metrics.jsonl", "loss.png"} <= {p.name for p in runs[0].iterdir()}
  assert f"run directory: runs/{runs[0].name}" in res.stdout


def test_subspace_update_choices_match_the_library():
  assert _cli.SUBSPACE_UPDATES == st.SUBSPACE_UPDATES
  transport = next(a for a in _cli.build_parser()._actions
                   if a.dest == "transport")
  from subtrack_optax import _equations  # pylint: disable=g-import-not-at-top
  assert tuple(transport.choices) == _equations.TRANSPORTS


@pytest.fixture(scope="module")
def no_jax(tmp_path_factory):
  """A PYTHONPATH on which importing jax fails loudly."""
  root = tmp_path_factory.mktemp("no_jax")
  (root / "jax").mkdir()
  (root / "jax" / "__init__.py").write_text(
      "raise ImportError('jax was imported')\n")
  return dict(os.environ, PYTHONPATH=str(root))


@pytest.mark.parametrize("flag,value", [
    ("--steps", "0"), ("--rank", "0"), ("--rank", "-3"), ("--lr", "0"),
    ("--lr", "-1e-3"), ("--batch-size", "0"), ("--b2", "1"),
])
def test_argument_errors_come_before_jax(no_jax, flag, value):
  cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py"),
         f"{flag}={value}"]
  res = _monitor.run(cmd, env=no_jax)
  assert res.returncode == 2, res.stderr[-2000:]
  assert f"error: {flag} must be" in res.stderr, res.stderr[-2000:]
  assert "jax was imported" not in res.stderr


def test_help_comes_before_jax(no_jax):
  cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py"),
         "--help"]
  res = _monitor.run(cmd, env=no_jax)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--out-dir" in res.stdout and "runs/CONFIG-OPTIMIZER-TIME" in res.stdout
