"""Gemma 3 batches: the in-jit layout of images for the model.

Batch arrays (leading record axis B, written by the data pipeline's vision adapter):
  pixel_values float32 [B, I, 3, S, S]  the record's images, zero images up to the budget I
  num_images   int32 [B]                how many of them are real
Text positions stay 1D. `model_inputs` keeps the pixels grouped per record: the model encodes
each record's images once, and the text rows of record b (its pair's chosen and rejected, or its
one shared / SFT / prompt row) read their placeholder runs from record b's images, in order
(`vlm.splice_grouped`), so a pair's features stay on its device. Without `num_images` (a
text-only batch) the text layout is used unchanged.
"""

from __future__ import annotations

from jaxdpo.models import batching


def model_inputs(batch: dict, rows_per_record: int) -> dict:
  """[B, ...] batch -> inputs of `Gemma3VLM.hidden_states` over R text rows."""
  out = batching.text_inputs(batch, rows_per_record)
  if "num_images" not in batch:
    return out
  out["pixel_values"] = batch["pixel_values"]  # [B, I, 3, S, S]: grouped per record
  return out
