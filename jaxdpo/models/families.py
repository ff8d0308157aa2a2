"""Imports every built-in family module; each registers itself with `registry.register`."""

from __future__ import annotations

import jaxdpo.models.qwen2_5_vl.family  # noqa: F401
import jaxdpo.models.gemma3.family  # noqa: F401
