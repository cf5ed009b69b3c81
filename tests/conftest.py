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

# A test module whose tests take a ``report`` fixture runs its ``WORKER``
# script in a subprocess (the multi-device and TPU tests). When such a test
# is selected, its worker starts in the background at the end of collection,
# in collection order, one at a time (tests/_monitor.py: prestart), so it
# compiles on the second core while the in-process tests compile on the
# first.


def pytest_collection_modifyitems(session, config, items):
  del session, config
  from tests import _monitor  # pylint: disable=g-import-not-at-top
  workers = [getattr(getattr(item, "module", None), "WORKER", None)
             for item in items
             if "report" in getattr(item, "fixturenames", ())]
  _monitor.prestart(list(dict.fromkeys(w for w in workers if w is not None)))


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  from tests import _monitor  # pylint: disable=g-import-not-at-top
  _monitor.kill_children()
