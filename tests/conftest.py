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
