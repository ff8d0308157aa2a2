"""Batches -> model inputs inside the jitted steps (and for generation).

Every leaf of a batch has a leading batch axis (pairs for DPO, sequences for SFT and
generation), so `update.batch_shardings` (leading axis over data x fsdp), per-host row
selection and gradient-accumulation micro-batches treat image leaves like token leaves: a
record (or pair) and its images always sit on the same device. The family-specific layouts
below are turned into what the models take here, inside jit.

Text (every family):
  input_ids, segment_ids, loss_mask  int [B, 2, T] (pairs) or [B, T]; positions [B, 2, T] / [B, T].
Qwen2.5-VL (batch holds `image_grid_thw`):
  pixel_values [B, P, E], image_grid_thw [B, I, 3], positions [B, 2, 3, T] / [B, 3, T].
  -> positions [3, R, T]; pixel_values stays one vision row per record; `vision_row` [R]
     names each text row's vision row, so a pair's chosen and rejected rows share one run
     of the vision tower.
Gemma 3 (batch holds `num_images`):
  pixel_values [B, I, 3, S, S], num_images [B].
  -> pixel_values [B*I, 3, S, S] (each pair's images once) and `image_index` [R*I]: the
     k-th placeholder run of the flattened batch (row-major, as the model counts them) takes
     image `image_index[k]`, i.e. its pair's j-th image.
R = 2B text rows (c0, r0, c1, r1, ...) for pairs, B otherwise.
"""

from __future__ import annotations

import jax.numpy as jnp

TEXT_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


def pair_inputs(batch: dict) -> dict:
  """[B, 2, ...] pair batch -> model inputs over 2B rows (c0, r0, c1, r1, ...)."""
  return _inputs(batch, rows_per_record=2)


def seq_inputs(batch: dict) -> dict:
  """[B, ...] sequence batch -> model inputs over B rows."""
  return _inputs(batch, rows_per_record=1)


def _inputs(batch: dict, rows_per_record: int) -> dict:
  b = batch["input_ids"].shape[0]
  lead = (b * rows_per_record,)
  qwen = "image_grid_thw" in batch
  out = {}
  for k in TEXT_KEYS:
    if k not in batch:
      continue
    v = batch[k]
    if k == "positions" and qwen:  # [B, (2,) 3, T] -> [3, R, T]
      out[k] = jnp.moveaxis(v.reshape(lead + v.shape[-2:]), 1, 0)
    else:
      out[k] = v.reshape(lead + v.shape[1 + (rows_per_record > 1):])
  record_of_row = jnp.repeat(jnp.arange(b, dtype=jnp.int32), rows_per_record)
  if qwen:
    out["pixel_values"] = batch["pixel_values"]
    out["image_grid_thw"] = batch["image_grid_thw"]
    out["vision_row"] = record_of_row
  elif "num_images" in batch:
    pixels = batch["pixel_values"]
    per_record = pixels.shape[1]
    out["pixel_values"] = pixels.reshape((b * per_record,) + pixels.shape[2:])
    out["image_index"] = image_index(jnp.repeat(batch["num_images"], rows_per_record), record_of_row, per_record)
  return out


def image_index(num_images_R, record_R, per_record: int):
  """Image of every placeholder run of the flattened rows (Gemma 3's `image_index`).

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
