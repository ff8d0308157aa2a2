"""Vision features into text rows, pair-local: each text row reads only its own record's features.

Layout: R feature groups [R, N, D] for B text rows, B a multiple of R. The text rows come in R
consecutive groups of B / R rows (a DPO pair's chosen and rejected: 2; the shared, packed, SFT and
prompt rows: 1), group r reading features[r]. A group's N = S * F feature slots hold S pair slots
of F each: S = 1 except in packed rows (`jaxdpo.data.packing`), where the pair in segment s (its
segment id) reads slot s - 1. A placeholder's feature is the k-th of its pair, k counted over the
pair's placeholders in the row, in order.

The index of every placeholder is computed from its own row (cumulative counts along T, one count
per segment), and the features are taken along N, batched over the groups: nothing reaches across
the leading axis, so with text rows and features sharded alike on the batch axes no device needs
another's features (`tests/test_vision_splice_hlo.py` holds the compiled step to that).
"""

from __future__ import annotations

import jax.numpy as jnp


def feature_index(is_image_BT, segment_BT, slots: int, per_slot: int):
  """int [B, T]: each placeholder's index into its group's `slots * per_slot` feature slots
  (0 off the placeholders).

  Args:
    is_image_BT: bool, the placeholder tokens (real tokens only).
    segment_BT: int segment ids; segment s > 0 is pair slot s - 1 (always 0 when `slots` is 1).
    slots: pair slots per group.
    per_slot: feature slots of each pair slot.
  """
  image_BT = is_image_BT.astype(jnp.int32)
  slot_BT = jnp.clip(segment_BT - 1, 0, slots - 1)
  # Placeholders of the row before this token's pair: the exclusive cumulative count per segment.
  count_BS = jnp.sum(image_BT[:, :, None] * (slot_BT[:, :, None] == jnp.arange(slots)), axis=1, dtype=jnp.int32)
  before_BS = jnp.cumsum(count_BS, axis=1) - count_BS
  k_BT = jnp.cumsum(image_BT, axis=1) - 1 - jnp.take_along_axis(before_BS, slot_BT, axis=1)
  return jnp.where(is_image_BT, slot_BT * per_slot + jnp.clip(k_BT, 0, per_slot - 1), 0)


def splice(x_BTD, features_RND, index_BT, is_image_BT):
  """x with each placeholder replaced by features[group of its row, index_BT] (module docstring)."""
  r, n, d = features_RND.shape
  b, t = index_BT.shape
  if b % r:
    raise ValueError(f"{b} text rows do not split into groups over {r} rows of vision features")
  taken_RKD = jnp.take_along_axis(features_RND, index_BT.reshape(r, (b // r) * t, 1), axis=1)
  return jnp.where(is_image_BT[..., None], taken_RKD.reshape(b, t, d).astype(x_BTD.dtype), x_BTD)
