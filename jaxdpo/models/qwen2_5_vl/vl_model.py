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
  Or, packed into R vision rows (`inputs.pack_vision`): pixel_values [R, P, E] and
  image_grid_thw [R, I, 3], images kept in order and each row end-padded; this bounds the
  vision attention masks at [P, P] per row when a batch holds many large images.
The k-th image-pad token of the batch (row-major) receives the k-th real merged vision token, as
in transformers; padding patches are never read.
  vision_row    optional int [B] (with 3D pixel_values): text row b takes its image tokens, in
                order, from vision row vision_row[b] instead; rows sharing images (a DPO
                pair) share a vision row, so the vision tower runs once for both.
  vision_group  optional int [B] (instead of `vision_row`; 3D or 4D pixel_values): the text rows come
                in R consecutive groups of B / R rows (a DPO pair's chosen and rejected; one row
                per record in the shared and SFT layouts) and text row b reads vision row
                vision_group[b] = b // (B / R). The splice is then a batched take along each
                group's own vision row (`jaxdpo.models.splice`): with text and vision rows
                sharded alike on the batch axes, no device needs another's features. Packed
                rows (several pairs per row, told apart by segment ids) give one vision row per
                pair slot: pixel_values [R, S, P, E], image_grid_thw [R, S, I, 3]; segment s
                reads slot s - 1.
Text-only batches may omit `pixel_values` / `image_grid_thw` (or give P = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.models import attention, decoder, splice
from jaxdpo.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from jaxdpo.models.qwen2_5_vl.model import Qwen2Decoder, text_positions
from jaxdpo.models.qwen2_5_vl.vision import VisionTower


def merged_counts(image_grid_thw, merge_unit: int):
  """Real merged tokens per row of packed images: int [R] from grids [I, 3] or [R, I, 3]."""
  grid = jnp.asarray(image_grid_thw)
  grid = grid[None] if grid.ndim == 2 else grid
  return jnp.sum(jnp.prod(grid, axis=-1), axis=-1) // merge_unit


def splice_images(x_BTD, features_RGO, counts_R, image_mask_BT):
  """Puts the k-th real vision token where the k-th True of `image_mask_BT` (row-major) is.

  Args:
    x_BTD: token embeddings.
    features_RGO: merged vision tokens, R rows of G slots; row r holds `counts_R[r]` real
      tokens first, then padding. Real tokens are ordered row by row.
    counts_R: int [R].
    image_mask_BT: bool, the image-pad tokens.
  """
  r, g, o = features_RGO.shape
  k_BT = (jnp.cumsum(image_mask_BT.reshape(-1).astype(jnp.int32)) - 1).reshape(image_mask_BT.shape)
  ends_R = jnp.cumsum(counts_R)
  row_BT = jnp.minimum(jnp.searchsorted(ends_R, k_BT, side="right"), r - 1)
  slot_BT = jnp.clip(k_BT - (ends_R - counts_R)[row_BT], 0, g - 1)
  features_BTO = features_RGO.reshape(r * g, o)[row_BT * g + slot_BT]
  return jnp.where(image_mask_BT[..., None], features_BTO.astype(x_BTD.dtype), x_BTD)


def splice_images_by_row(x_BTD, features_RGO, vision_row_B, image_mask_BT):
  """Like `splice_images`, but text row b reads its placeholders, in order, from vision row
  `vision_row_B[b]` (rows may share a vision row: a DPO pair's chosen and rejected)."""
  r, g, o = features_RGO.shape
  k_BT = jnp.clip(jnp.cumsum(image_mask_BT.astype(jnp.int32), axis=1) - 1, 0, g - 1)
  features_BTO = features_RGO.reshape(r * g, o)[vision_row_B[:, None] * g + k_BT]
  return jnp.where(image_mask_BT[..., None], features_BTO.astype(x_BTD.dtype), x_BTD)


def check_groups(vision_group_B, rows: int, groups: int):
  """`vision_group` must say b // (B / R) for every text row b (checked when concrete)."""
  if rows % groups:
    raise ValueError(f"{rows} text rows do not split into groups over {groups} vision rows")
  if isinstance(vision_group_B, jax.core.Tracer):
    return
  want = np.arange(rows) // (rows // groups)
  if not np.array_equal(np.asarray(vision_group_B), want):
    raise ValueError(f"vision_group must be b // {rows // groups} for every text row b ({want.tolist()}), got "
                     f"{np.asarray(vision_group_B).tolist()}; use vision_row for other layouts")


class Qwen2_5_VL(decoder.LanguageModelHead, nnx.Module):
  """`Qwen2_5_VLForConditionalGeneration` without the loss: hidden states, logits, generation."""

  def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.config = cfg
    self.visual = VisionTower(cfg.vision, rngs=rngs, param_dtype=param_dtype, attention_impl=attention_impl)
    self.language_model = Qwen2Decoder(cfg.text, rngs=rngs, param_dtype=param_dtype, attention_impl=attention_impl)

  def image_features(self, pixel_values, image_grid_thw):
    """Merged vision tokens [R, P / 4, D] of the packed images (padding at the end of each row)."""
    return self.visual(pixel_values, image_grid_thw)

  def embed(self, inputs: dict):
    """Token embeddings with image features spliced in at the image-pad tokens: [B, T, D]."""
    ids, seg = inputs["input_ids"], inputs["segment_ids"]
    x_BTD = self.language_model.embed(ids)
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.size == 0:
      return x_BTD
    grid = inputs["image_grid_thw"]
    image_mask_BT = (ids == self.config.image_token_id) & (seg != 0)
    if "vision_group" in inputs:
      return self._splice_grouped(x_BTD, pixels, grid, inputs["vision_group"], seg, image_mask_BT)
    features_RGD = self.image_features(pixels, grid)
    if "vision_row" in inputs:
      return splice_images_by_row(x_BTD, features_RGD, inputs["vision_row"], image_mask_BT)
    counts_R = merged_counts(grid, self.config.vision.merge_unit)
    return splice_images(x_BTD, features_RGD, counts_R, image_mask_BT)

  def _splice_grouped(self, x_BTD, pixels, grid, vision_group_B, seg_BT, image_mask_BT):
    """`vision_group` inputs: pixels [R, P, E] (one vision row per record), or [R, S, P, E] for
    packed rows (one vision row per pair slot; `jaxdpo.models.splice`)."""
    r = pixels.shape[0]
    slots = pixels.shape[1] if pixels.ndim == 4 else 1
    check_groups(vision_group_B, x_BTD.shape[0], r)
    features = self.image_features(pixels.reshape((r * slots,) + pixels.shape[-2:]),
                                   grid.reshape((r * slots,) + grid.shape[-2:]))  # [R * S, G, D]
    per_slot = features.shape[1]
    index_BT = splice.feature_index(image_mask_BT, seg_BT, slots, per_slot)
    return splice.splice(x_BTD, features.reshape(r, slots * per_slot, -1), index_BT, image_mask_BT)

  def _positions(self, inputs: dict):
    if "positions" in inputs:
      return inputs["positions"]
    if inputs.get("pixel_values") is not None and inputs["pixel_values"].size > 0:
      raise ValueError("Qwen2.5-VL inputs with images need `positions` [3, B, T] from "
                       "jaxdpo.models.qwen2_5_vl.rope_index.get_rope_index (or inputs.make_inputs)")
    return text_positions(inputs["segment_ids"])

  def hidden_states(self, inputs: dict):
    """The family-neutral entry used by DPO/SFT steps: inputs dict (see module doc) -> [B, T, D]."""
    h_BTD, _ = self.language_model(positions=self._positions(inputs), segment_ids=inputs["segment_ids"],
                                   inputs_embeds=self.embed(inputs), structure=attention.from_inputs(inputs))
    return h_BTD

  # Head and generation: the decoder's (`decoder.LanguageModelHead`). Its `next_positions` carries
  # rope_deltas implicitly (the last prompt position + 1 on every stream, what transformers' generate uses).

  def prefill(self, inputs: dict, cache: dict):
    """Left-padded prompts with images -> (fp32 logits [B, V] at the last position, cache)."""
    return self.language_model.prefill_embeds(self.embed(inputs), self._positions(inputs), inputs["segment_ids"],
                                              cache)
