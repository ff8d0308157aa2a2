"""Qwen2.5-VL (and Nanonets-OCR2-3B) in flax.nnx: vision tower + Qwen2 decoder with M-RoPE.

Held to transformers' `Qwen2_5_VLForConditionalGeneration` by the parity tests. The parameter
tree is `visual.*` (the vision tower) and `language_model.*` (the decoder, its embedding and, when
untied, its LM head).

Model inputs (a dict; every shape static under jit):
  input_ids     int [B, T]  with one image-pad token per merged image token.
  segment_ids   int [B, T]  0 = padding (left or right); never derived from token ids.
  positions     int [3, B, T] M-RoPE positions, computed on the host by
                `rope_index.get_rope_index` (`inputs.make_inputs` does it all).
  pixel_values  float [P, E] patches of every image of the batch, concatenated in order of
                appearance (row-major over the batch), zero rows appended to a bucket size
                (a multiple of spatial_merge_size**2).
  image_grid_thw int [I, 3] the images' grids in the same order, zero rows appended.
The k-th image-pad token of the batch (row-major) receives the k-th merged vision token, as in
transformers; padding rows of `pixel_values` come last so they are never read. Text-only batches
may omit `pixel_values` / `image_grid_thw` (or give P = 0).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxdpo.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from jaxdpo.models.qwen2_5_vl.model import Qwen2Decoder, text_positions
from jaxdpo.models.qwen2_5_vl.vision import VisionTower


def splice_images(x_BTD, features_GO, image_mask_BT):
  """Puts the k-th row of `features_GO` where the k-th True of `image_mask_BT` (row-major) is."""
  flat = image_mask_BT.reshape(-1).astype(jnp.int32)
  index_BT = jnp.clip(jnp.cumsum(flat) - 1, 0, features_GO.shape[0] - 1).reshape(image_mask_BT.shape)
  return jnp.where(image_mask_BT[..., None], features_GO[index_BT].astype(x_BTD.dtype), x_BTD)


class Qwen2_5_VL(nnx.Module):
  """`Qwen2_5_VLForConditionalGeneration` without the loss: hidden states, logits, generation."""

  def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.config = cfg
    self.visual = VisionTower(cfg.vision, rngs=rngs, param_dtype=param_dtype, attention_impl=attention_impl)
    self.language_model = Qwen2Decoder(cfg.text, rngs=rngs, param_dtype=param_dtype, attention_impl=attention_impl)

  def image_features(self, pixel_values_PE, image_grid_thw):
    """Merged vision tokens [P / 4, D] of the packed images (padding rows at the end)."""
    return self.visual(pixel_values_PE, image_grid_thw)

  def embed(self, inputs: dict):
    """Token embeddings with image features spliced in at the image-pad tokens: [B, T, D]."""
    ids, seg = inputs["input_ids"], inputs["segment_ids"]
    x_BTD = self.language_model.embed(ids)
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.shape[0] == 0:
      return x_BTD
    features_GD = self.image_features(pixels, inputs["image_grid_thw"])
    return splice_images(x_BTD, features_GD, (ids == self.config.image_token_id) & (seg != 0))

  def _positions(self, inputs: dict):
    if "positions" in inputs:
      return inputs["positions"]
    if inputs.get("pixel_values") is not None and inputs["pixel_values"].shape[0] > 0:
      raise ValueError("Qwen2.5-VL inputs with images need `positions` [3, B, T] from "
                       "jaxdpo.models.qwen2_5_vl.rope_index.get_rope_index (or inputs.make_inputs)")
    return text_positions(inputs["segment_ids"])

  def hidden_states(self, inputs: dict):
    """The family-neutral entry used by DPO/SFT steps: inputs dict (see module doc) -> [B, T, D]."""
    h_BTD, _ = self.language_model(positions=self._positions(inputs), segment_ids=inputs["segment_ids"],
                                   inputs_embeds=self.embed(inputs))
    return h_BTD

  def unembedding(self):
    """The LM-head matrix [V, D] (the embedding when tied)."""
    return self.language_model.unembedding()

  def logits(self, h_BTD):
    """Full logits; for tests and generation only (training uses chunked log-probs)."""
    return self.language_model.logits(h_BTD)

  # Generation protocol: the cache is the decoder's; `next_positions` carries rope_deltas implicitly
  # (it is the last prompt position + 1 on every stream, exactly what transformers' generate uses).

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    return self.language_model.init_cache(batch_size, max_len, dtype)

  def prefill(self, inputs: dict, cache: dict):
    """Left-padded prompts with images -> (fp32 logits [B, V] at the last position, cache)."""
    return self.language_model.prefill_embeds(self.embed(inputs), self._positions(inputs), inputs["segment_ids"],
                                              cache)

  def decode(self, tokens_B, cache: dict):
    return self.language_model.decode(tokens_B, cache)
