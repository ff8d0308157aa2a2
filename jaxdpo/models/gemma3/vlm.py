"""Gemma 3 vision-language model (transformers' `Gemma3ForConditionalGeneration`).

Images under jit. `pixel_values` is [I, 3, S, S] with a static image count I that may include
padding images (e.g. zeros) beyond those referenced. Image i fills, in order, the i-th run of
`mm_tokens_per_image` image-placeholder tokens of the batch read row-major, exactly as
transformers' `masked_scatter` does; unreferenced images are encoded and ignored. So the only
bookkeeping is the placeholder ids themselves (`config.image_token_id`, as the processor
writes them).

Sharing images between rows (DPO's chosen and rejected rows repeat their prompt's images):
pass `image_index` int [R], R >= the number of placeholder runs in the batch, so that run r
(row-major) takes image `image_index[r]`; then each distinct image is encoded once. Soft
tokens computed elsewhere can be passed as `image_embeds` [I, M, D] (from `encode_images`)
instead of `pixel_values`.

Images grouped per record (the DPO, SFT and generation batches): `pixel_values` [R, I, 3, S, S]
(or `image_embeds` [R, I, M, D]), R dividing the number of text rows B. The text rows come in R
consecutive groups of B / R rows (a DPO pair's chosen and rejected), and the j-th placeholder run
of a row takes image j of its group. The splice is then a batched take along each group's own
soft tokens: with text rows and images sharded alike on the batch axes, no device needs
another's features (nor a batch-wide count of placeholder runs). Image slots beyond a row's runs
are encoded and never read. Packed rows (several pairs per row, told apart by segment ids) give
the images per pair slot: [R, S, I, 3, S', S'] / [R, S, I, M, D]; segment s reads slot s - 1
(`jaxdpo.models.splice`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import attention, decoder, splice
from jaxdpo.models.gemma3.config import Gemma3Config
from jaxdpo.models.gemma3.model import Gemma3TextModel, image_groups
from jaxdpo.models.gemma3.projector import MultiModalProjector
from jaxdpo.models.gemma3.siglip import SiglipVisionModel


class Gemma3VLM(decoder.LanguageModelHead, nnx.Module):
  """SigLIP -> projector -> Gemma 3 decoder, with the family-neutral and generation entries."""

  def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.config = cfg
    self.vision_tower = SiglipVisionModel(cfg.vision, rngs=rngs, param_dtype=param_dtype,
                                          attention_impl=attention_impl)
    self.multi_modal_projector = MultiModalProjector(cfg, rngs=rngs, param_dtype=param_dtype)
    self.language_model = Gemma3TextModel(cfg.text, rngs=rngs, param_dtype=param_dtype,
                                          attention_impl=attention_impl)

  def encode_images(self, pixel_values):
    """Soft tokens [I, M, D] for images [I, 3, S, S] (normalised pixels)."""
    return self.multi_modal_projector(self.vision_tower(pixel_values))

  def embed_inputs(self, inputs: dict):
    """Text embeddings with image soft tokens spliced in, and the bidirectional image groups.

    Returns:
      (embeds [B, T, D] in the parameter dtype, image groups int [B, T] or None without images).
    """
    ids_BT = inputs["input_ids"]
    seg_BT = inputs["segment_ids"]
    is_image_BT = (ids_BT == self.config.image_token_id) & (seg_BT != 0)
    # The placeholder id may lie outside the vocabulary (tiny configs); its row is replaced anyway.
    x_BTD = self.language_model.embed(jnp.where(is_image_BT, 0, ids_BT))
    if "image_embeds" in inputs:
      feats_IMD = inputs["image_embeds"]
    elif "pixel_values" in inputs:
      pixels = inputs["pixel_values"]
      feats_IMD = self.encode_images(pixels.reshape((-1,) + pixels.shape[-3:]))
      feats_IMD = feats_IMD.reshape(pixels.shape[:-3] + feats_IMD.shape[-2:])
    else:
      return x_BTD, None
    b, t, d = x_BTD.shape
    feats_IMD = feats_IMD.astype(x_BTD.dtype)
    if feats_IMD.ndim >= 4:  # [R, I, M, D] grouped per record, [R, S, I, M, D] per pair slot (docstring)
      r, slots = feats_IMD.shape[0], feats_IMD.shape[1] if feats_IMD.ndim == 5 else 1
      per_slot = feats_IMD.shape[-3] * feats_IMD.shape[-2]
      index_BT = splice.feature_index(is_image_BT, seg_BT, slots, per_slot)
      x_BTD = splice.splice(x_BTD, feats_IMD.reshape(r, slots * per_slot, d), index_BT, is_image_BT)
      return x_BTD, image_groups(is_image_BT)
    # k-th placeholder of the batch (row-major) <- k-th soft token, as masked_scatter does.
    slot_BT = jnp.cumsum(is_image_BT.reshape(-1).astype(jnp.int32)).reshape(b, t) - 1
    if "image_index" in inputs:
      # Run r of placeholders takes image image_index[r]: rows can share one encoded image.
      m = feats_IMD.shape[1]
      index_R = inputs["image_index"]
      image_BT = jnp.take(index_R, jnp.clip(slot_BT // m, 0, index_R.shape[0] - 1))
      spliced_BTD = feats_IMD[jnp.clip(image_BT, 0, feats_IMD.shape[0] - 1), jnp.maximum(slot_BT, 0) % m]
    else:
      feats_ND = feats_IMD.reshape(-1, d)
      spliced_BTD = jnp.take(feats_ND, jnp.clip(slot_BT, 0, feats_ND.shape[0] - 1), axis=0)
    x_BTD = jnp.where(is_image_BT[..., None], spliced_BTD, x_BTD)
    return x_BTD, image_groups(is_image_BT)

  def hidden_states(self, inputs: dict):
    """Family-neutral entry used by DPO/SFT steps: inputs dict -> hidden [B, T, D].

    Keys: `input_ids`, `segment_ids` (0 = pad), `positions` (all int [B, T]); optionally
    `pixel_values` [I, 3, S, S] or `image_embeds` [I, M, D], and `image_index` [R] (see the
    module docstring).
    """
    x_BTD, groups_BT = self.embed_inputs(inputs)
    h_BTD, _ = self.language_model(inputs_embeds=x_BTD, positions=inputs["positions"],
                                   segment_ids=inputs["segment_ids"], image_groups_BT=groups_BT,
                                   structure=attention.from_inputs(inputs))
    return h_BTD

  # Head and generation: the text model's (`decoder.LanguageModelHead`); images only enter through the prompt.

  def prefill(self, inputs: dict, cache: dict):
    """Left-padded prompt (`input_ids`, `segment_ids`, optional images) -> (fp32 logits [B, V], cache)."""
    x_BTD, groups_BT = self.embed_inputs(inputs)
    return self.language_model.prefill_embeds(x_BTD, inputs["segment_ids"], cache, groups_BT)
