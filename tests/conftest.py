"""Shared test configuration: CPU only, cheaper XLA compiles.

The suite is dominated by XLA compile time on the 2-core CI machine.
``--xla_backend_optimization_level=0`` cuts the CPU backend's compile time by
about a third; it changes how fast the compiled code runs, not what it
computes (both sides of every equality test compile under the same flags).
Set ``XLA_FLAGS`` yourself to override.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# Worker scripts of the multi-device and TPU tests, longest first: when a
# test that needs one is selected, it starts in the background at the end of
# collection (tests/_monitor.py: prestart), so it compiles on the second core
# while the in-process tests compile on the first.
_WORKERS = {  # test module -> the worker script its report fixture runs
    "test_tpu_aot.py": "_tpu_worker.py",
    "test_nnx.py": "_nnx_worker.py",
    "test_sharding.py": "_sharding_worker.py",
}


def pytest_collection_modifyitems(session, config, items):
  del session, config
  from tests import _monitor  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  needed = {os.path.basename(str(item.fspath)) for item in items
            if "report" in getattr(item, "fixturenames", ())}
  _monitor.prestart([os.path.join(here, w) for m, w in _WORKERS.items()
                     if m in needed])


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  from tests import _monitor  # pylint: disable=g-import-not-at-top
  _monitor.kill_children()
