"""Shared test configuration: CPU only, float32 defaults."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
