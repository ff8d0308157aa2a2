"""Training and generation batches -> the inputs a model's `hidden_states` takes, inside jit.

Every leaf of a batch leads with a record axis B (pairs for DPO, sequences for SFT and
generation), so the batch sharding, per-host row selection and micro-batching treat every
leaf alike and a record's images stay on the device of its text rows. A pair batch holds two
text rows per record (chosen, rejected): [B, 2, ...]. The model wants one row per text row,
R = B * rows_per_record rows (c0, r0, c1, r1, ...).

A prefix-shared batch (`jaxdpo.data.shared_rows`) has one row per record (rows_per_record = 1)
and adds the attention keys `attn_order` / `attn_branch` (`attention.from_inputs` reads them).

`text_inputs` does this for the text keys; a family with images registers its own
`Family.model_inputs`, which starts from `text_inputs` and adds its image bookkeeping.
"""

from __future__ import annotations

import jax.numpy as jnp

TEXT_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "attn_order", "attn_branch", "pack_count")


def text_inputs(batch: dict, rows_per_record: int) -> dict:
  """[B, (rows,) ...] text leaves -> [R, ...] (R = B * rows_per_record); other keys are dropped."""
  b = batch["input_ids"].shape[0]
  lead = (b * rows_per_record,)
  skip = 1 + (rows_per_record > 1)
  return {k: batch[k].reshape(lead + batch[k].shape[skip:]) for k in TEXT_KEYS if k in batch}


def record_of_row(batch: dict, rows_per_record: int):
  """int32 [R]: the record (pair) each text row belongs to."""
  b = batch["input_ids"].shape[0]
  return jnp.repeat(jnp.arange(b, dtype=jnp.int32), rows_per_record)
