"""Qwen2.5-VL batches: host-side M-RoPE positions and the in-jit layout the model takes.

Batch arrays (leading record axis B, written by the data pipeline's vision adapter):
  pixel_values   float32 [B, P, E]   one vision row per record, zero patches up to the budget
  image_grid_thw int32 [B, I, 3]     the record's grids, zero rows up to the image budget
  positions      int32 [B, 2, 3, T] (pairs) or [B, 3, T]: M-RoPE positions (`row_positions`)
`model_inputs` turns them into positions [3, R, T], the record's pixel rows, and `vision_group`
[R] naming each text row's vision row (its record), so a pair's two rows share one run of the tower
and the splice stays on the device of the pair (`vl_model.splice_images_grouped`).
Without `image_grid_thw` (a text-only batch) the text layout is used unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdpo.models import batching
from jaxdpo.models.qwen2_5_vl import rope_index


def row_positions(model_cfg, input_ids_T, segment_ids_T, image_grid_thw) -> np.ndarray:
  """M-RoPE positions int [3, T] of one text row whose image runs follow `image_grid_thw` [I, 3]."""
  v = model_cfg.vision
  pos, _ = rope_index.get_rope_index(np.asarray(input_ids_T)[None], np.asarray(segment_ids_T)[None],
                                     np.asarray(image_grid_thw, np.int64).reshape(-1, 3),
                                     spatial_merge_size=v.spatial_merge_size, image_token_id=model_cfg.image_token_id,
                                     video_token_id=model_cfg.video_token_id, tokens_per_second=v.tokens_per_second)
  return pos[:, 0]


def model_inputs(batch: dict, rows_per_record: int) -> dict:
  """[B, ...] batch -> inputs of `Qwen2_5_VL.hidden_states` over R text rows."""
  if "image_grid_thw" not in batch:
    return batching.text_inputs(batch, rows_per_record)
  out = batching.text_inputs({k: v for k, v in batch.items() if k != "positions"}, rows_per_record)
  pos = batch["positions"]  # [B, (2,) 3, T] -> [3, R, T]
  out["positions"] = jnp.moveaxis(pos.reshape((out["input_ids"].shape[0],) + pos.shape[-2:]), 1, 0)
  out["pixel_values"] = batch["pixel_values"]
  out["image_grid_thw"] = batch["image_grid_thw"]
  out["vision_group"] = batching.record_of_row(batch, rows_per_record)
  return out
