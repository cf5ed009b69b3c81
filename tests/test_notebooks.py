"""Executes the notebooks at tiny sizes (SUBTRACK_NOTEBOOK_TEST=1)."""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, monkeypatch_module):
  """A kernel spec that runs this interpreter (the test's venv), found first."""
  pytest.importorskip("ipykernel")
  data_dir = tmp_path_factory.mktemp("jupyter")
  spec_dir = data_dir / "kernels" / "subtrack-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "subtrack-optax tests", "language": "python"}))
  monkeypatch_module.setenv(
      "JUPYTER_PATH", os.pathsep.join(
          [str(data_dir)] + [p for p in os.environ.get(
              "JUPYTER_PATH", "").split(os.pathsep) if p]))
  monkeypatch_module.setenv("SUBTRACK_NOTEBOOK_TEST", "1")
  monkeypatch_module.setenv("JAX_PLATFORMS", "cpu")
  return "subtrack-test"


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def _run(name, kernel_name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name=kernel_name,
      resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", out
      text.append(out.get("text", ""))
      text.append(str(out.get("data", {}).get("text/plain", "")))
      text.append(str(out.get("data", {}).get("text/markdown", "")))
  images = sum("image/png" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))
  return "".join(text), images


def test_quickstart(kernel_name):
  text, images = _run("quickstart.ipynb", kernel_name)
  assert "optimizer state: SubTrack++" in text
  assert "subtrack++  final loss" in text and "adamw       final loss" in text
  assert images >= 1


def test_pretrain_llama(kernel_name):
  text, images = _run("pretrain_llama.ipynb", kernel_name)
  assert text.count("eval loss") >= 3          # one final line per optimizer
  assert "captured energy" in text
  assert images >= 1
