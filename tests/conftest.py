"""Test-wide setup: 8 fake CPU devices for mesh tests, fp32 everywhere, no network."""

import os

# Must happen before jax is imported anywhere: mesh tests need 8 devices on one CPU.
from tests import _xla_flags  # noqa: E402  (imports nothing)

os.environ.setdefault("XLA_FLAGS", _xla_flags.with_devices(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
