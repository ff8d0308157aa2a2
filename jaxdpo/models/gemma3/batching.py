"""Gemma 3 batches: the in-jit layout of images for the model.

Batch arrays (leading record axis B, written by the data pipeline's vision adapter):
  pixel_values float32 [B, I, 3, S, S]  the record's images, zero images up to the budget I
  num_images   int32 [B]                how many of them are real
Text positions stay 1D. `model_inputs` flattens the pixels to [B*I, 3, S, S] (each pair's
images once) and adds `image_index` [R*I]: the k-th placeholder run of the flattened rows
(row-major, as the model counts them) takes image `image_index[k]`, its record's j-th image.
Without `num_images` (a text-only batch) the text layout is used unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdpo.models import batching


def model_inputs(batch: dict, rows_per_record: int) -> dict:
  """[B, ...] batch -> inputs of `Gemma3VLM.hidden_states` over R text rows."""
  out = batching.text_inputs(batch, rows_per_record)
  if "num_images" not in batch:
    return out
  pixels = batch["pixel_values"]
  b, per_record = pixels.shape[:2]
  out["pixel_values"] = pixels.reshape((b * per_record,) + pixels.shape[2:])
  out["image_index"] = image_index(jnp.repeat(batch["num_images"], rows_per_record),
                                   batching.record_of_row(batch, rows_per_record), per_record)
  return out


def image_index(num_images_R, record_R, per_record: int):
  """Image of every placeholder run of the flattened rows.

  Args:
    num_images_R: int [R] images (runs of placeholders) in each text row.
    record_R: int [R] the record whose images text row r shows.
    per_record: image slots per record (pixel_values holds record b's images at
      b * per_record + j).

  Returns:
    int [R * per_record]: run k (counted row-major over the rows) -> its image slot; runs beyond
    the real ones point at slot 0 and are never read.
  """
  r = num_images_R.shape[0]
  ends_R = jnp.cumsum(num_images_R)
  run_K = jnp.arange(r * per_record, dtype=jnp.int32)
  row_K = jnp.minimum(jnp.searchsorted(ends_R, run_K, side="right"), r - 1)
  j_K = run_K - (ends_R - num_images_R)[row_K]
  valid_K = run_K < ends_R[-1]
  return jnp.where(valid_K, record_R[row_K] * per_record + jnp.clip(j_K, 0, per_record - 1), 0).astype(jnp.int32)
