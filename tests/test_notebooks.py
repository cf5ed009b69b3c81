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
  assert "leaves projected" in text                     # st.list_leaves
  assert "subtrack++  final loss" in text and "adamw       final loss" in text
  assert images >= 1


def test_pretrain_llama(kernel_name):
  text, images = _run("pretrain_llama.ipynb", kernel_name)
  assert text.count("eval loss") >= 3          # one final line per optimizer
  assert "captured energy" in text
  assert images >= 1


# ------------------------------------------- the install cell (issue 13.9) --


def _install_cell(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  cell = next(c for c in nb.cells if c.cell_type == "code")
  assert "find_spec(\"subtrack_optax\")" in cell.source
  return cell.source


class _Shell:
  """Records the %pip lines a cell runs instead of running them."""

  def __init__(self):
    self.pip = []

  def run_line_magic(self, name, line, _stack_depth=1):
    """Expands ``{expr}`` in the caller's namespace, as IPython does."""
    from IPython.utils.text import DollarFormatter  # pylint: disable=g-import-not-at-top
    assert name == "pip"
    frame = sys._getframe(_stack_depth)  # pylint: disable=protected-access
    namespace = {**frame.f_globals, **frame.f_locals}
    self.pip.append(DollarFormatter().vformat(line, (), namespace))


def _run_install_cell(source, cwd, monkeypatch, source_env=""):
  """Runs ``source`` as IPython would, as if subtrack_optax were missing."""
  from IPython.core.inputtransformer2 import TransformerManager  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, "find_spec",
      lambda n, *a: None if n == "subtrack_optax" else real(n, *a))
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("SUBTRACK_OPTAX_SOURCE", source_env)
  monkeypatch.setattr(sys, "path", list(sys.path))
  shell = _Shell()
  code = TransformerManager().transform_cell(source)
  exec(code, {"get_ipython": lambda: shell})  # pylint: disable=exec-used
  return shell.pip


@pytest.mark.parametrize("name", ["quickstart.ipynb", "pretrain_llama.ipynb"])
def test_install_cell_installs_the_checkout(name, monkeypatch):
  pip = _run_install_cell(_install_cell(name), NOTEBOOKS, monkeypatch)
  assert pip == [f'install -q -e "{ROOT}[examples]"']


@pytest.mark.parametrize("name", ["quickstart.ipynb", "pretrain_llama.ipynb"])
def test_install_cell_outside_a_checkout(name, monkeypatch, tmp_path):
  source = _install_cell(name)
  url = "git+https://example.invalid/subtrack-optax.git"
  assert _run_install_cell(source, tmp_path, monkeypatch, url) == [
      f'install -q "subtrack-optax[examples] @ {url}"']
  assert _run_install_cell(source, tmp_path, monkeypatch, "/src/st") == [
      'install -q "/src/st[examples]"']
  with pytest.raises(RuntimeError, match="SOURCE"):
    _run_install_cell(source, tmp_path, monkeypatch)
