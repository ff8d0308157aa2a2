"""Profiles read by block: blocks, attention, MLP, the LM head and the vision towers carry
`jax.named_scope` names, checked in the lowered program's op locations."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.models import registry


def _scopes(fn, *args) -> set[str]:
  """Every op location (name stack) of `fn` lowered on `args`."""
  text = jax.jit(fn).lower(*args).as_text(debug_info=True)
  return set(re.findall(r'loc\("([^"]*)"', text))


def _has(scopes: set[str], path: str) -> bool:
  return any(f"/{path}/" in s for s in scopes)


def _build(name: str, preset: str):
  family = registry.get_family(name)
  return family.build(family.presets[preset](), nnx.Rngs(0), jnp.float32)


def _text_inputs(t: int = 5):
  ids = jnp.arange(3, 3 + t, dtype=jnp.int32)[None]
  return dict(input_ids=ids, segment_ids=jnp.ones_like(ids), positions=jnp.arange(t, dtype=jnp.int32)[None])


@pytest.mark.parametrize("name,preset", [("qwen2", "tiny"), ("gemma3_text", "tiny_text")])
def test_decoder_scopes(name, preset):
  model = _build(name, preset)
  scopes = _scopes(lambda x: model.logits(model.hidden_states(x)), _text_inputs())
  last = model.config.num_layers - 1
  for path in ("block_0/attention", "block_0/mlp", f"block_{last}/attention", "lm_head", "final_norm"):
    assert _has(scopes, path), (path, sorted(scopes)[:20])
  # Negative control: a scope that no module opens is not found.
  assert not _has(scopes, "block_0/vision_tower")


def test_qwen_vision_tower_scopes():
  model = _build("qwen2_5_vl", "tiny_vl")
  v = model.config.vision
  grid = np.array([[1, 4, 4]], np.int32)
  pixels = jnp.zeros((1, 16, v.patch_dim), jnp.float32)
  scopes = _scopes(lambda p: model.visual(p, grid), pixels)
  for path in ("vision_tower/block_0/attention", "vision_tower/block_0/mlp", "vision_tower/merger"):
    assert _has(scopes, path), path


def test_siglip_tower_and_projector_scopes():
  model = _build("gemma3", "tiny")
  side = model.config.vision.image_size
  scopes = _scopes(model.encode_images, jnp.zeros((1, 3, side, side), jnp.float32))
  for path in ("vision_tower/block_0/attention", "vision_tower/block_0/mlp"):
    assert _has(scopes, path), path
  assert any("/projector/" in s or s.endswith("/projector") for s in scopes)
