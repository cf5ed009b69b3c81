"""The package's layout: layered imports, no hidden state, short functions.

``docs/architecture.md`` has the module map these tests enforce.
"""

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "subtrack_optax"

# Each module may import (from this package) only modules of lower layers.
LAYERS = [
    ["_sharding"],                         # jax only
    ["_linalg", "_plans"],
    ["_tracking", "_frame", "_state", "_variables"],
    ["_equations"],
    ["_config"],
    ["_step"],
    ["_items"],
    ["_engine"],
    ["_transform", "_partition_specs", "_diagnostics", "_leaves"],
    ["__init__"],
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}

# Numerical kernels that are long because the algorithm is (their
# docstrings give the algorithm and its references); body lines, docstring
# excluded.
MAX_LINES = 60
LONG_KERNELS: set = set()


def _modules():
  return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _tree(name):
  return ast.parse((PACKAGE / f"{name}.py").read_text())


def _internal_imports(tree):
  """Names of this package's modules that ``tree`` imports (any depth)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "subtrack_optax":
        out |= {a.name for a in node.names}
      elif node.module.startswith("subtrack_optax."):
        out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("subtrack_optax."):
          out.add(a.name.split(".")[1])
  return out


def test_every_module_has_a_layer():
  assert set(_modules()) == set(LAYER)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_go_only_downward(name):
  for dep in _internal_imports(_tree(name)):
    assert dep in LAYER, f"{name} imports unknown module {dep}"
    assert LAYER[dep] < LAYER[name], (
        f"{name} (layer {LAYER[name]}) imports {dep} (layer {LAYER[dep]})")


def test_sharding_helpers_import_jax_only():
  allowed = {"__future__", "typing", "jax", "jax.numpy", "jax.sharding"}
  for node in ast.walk(_tree("_sharding")):
    if isinstance(node, ast.ImportFrom):
      assert node.module in allowed, node.module
    elif isinstance(node, ast.Import):
      assert all(a.name in allowed for a in node.names)


def _mutable_module_state(tree):
  """Module-level bindings to mutable containers or thread-locals."""
  found = []
  mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp,
             ast.SetComp)
  for node in tree.body:
    targets, value = [], None
    if isinstance(node, ast.Assign):
      targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign):
      targets, value = [node.target], node.value
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    if not names or names == ["__all__"] or value is None:
      continue
    call = (value.func.attr if isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute) else
            value.func.id if isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name) else None)
    if isinstance(value, mutable) or call in ("local", "list", "dict", "set",
                                              "defaultdict", "deque"):
      found.append(names[0])
  for node in ast.walk(tree):
    if isinstance(node, ast.Global):
      found += node.names
    if isinstance(node, ast.Import) and any(a.name == "threading"
                                            for a in node.names):
      found.append("import threading")
  return found


@pytest.mark.parametrize("name", _modules())
def test_no_module_level_mutable_state(name):
  assert not _mutable_module_state(_tree(name))


def test_mutable_state_detector_finds_what_it_should():
  tree = ast.parse("import threading\n_local = threading.local()\n"
                   "CACHE = {}\n__all__ = ['x']\nT = (1, 2)\n")
  assert _mutable_module_state(tree) == ["_local", "CACHE", "import threading"]


def _function_lengths(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = node.end_lineno - node.lineno + 1
      if ast.get_docstring(node, clean=False) is not None:
        doc = node.body[0]
        n -= doc.end_lineno - doc.lineno + 1
      yield node.name, n


@pytest.mark.parametrize("name", _modules())
def test_functions_are_short(name):
  long = [(f, n) for f, n in _function_lengths(_tree(name))
          if n > MAX_LINES and (name, f) not in LONG_KERNELS]
  assert not long, f"functions over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("name", _modules())
def test_each_module_imports_on_its_own(name):
  module = importlib.import_module(f"subtrack_optax.{name}"
                                   if name != "__init__" else "subtrack_optax")
  assert module.__doc__, f"{name} has no module docstring"


def test_each_equation_is_one_function_with_its_formula():
  from subtrack_optax import _equations  # pylint: disable=g-import-not-at-top
  for fn in ("project", "transport_general", "transport_rank1",
             "transport_moments", "adam_direction", "recovery_gains",
             "limit_growth", "back_project"):
    doc = getattr(_equations, fn).__doc__
    assert doc and ("math" in doc or "=" in doc), fn
