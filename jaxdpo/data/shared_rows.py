"""The prefix-shared pair layout: each pair is one row [P | C | R] (prompt, chosen, rejected).

Built on the host from the two-row batch of `pipeline.collate_pairs`, so every per-row value the
families compute there (Qwen2.5-VL's M-RoPE positions from the prompt's images, Gemma 3's image
runs) is taken over unchanged: chosen's slots are the chosen row's own prefix [0, p + c), and
rejected's tokens, positions and order are the rejected row's slots [p, p + r), so R continues
from P's end. Images stay per pair (one vision row per record) as in the two-row layout.

Batch arrays (leading pair axis B):
  input_ids, segment_ids int32 [B, T]    the shared row (segment 1 on real tokens, 0 on padding)
  positions              int32 [B, T] or the family's per-row layout ([B, 3, T] for M-RoPE)
  attn_order             int32 [B, T]    the token's slot in its unshared row (P and C: 0..p+c-1,
                                         R: p..p+r-1); causality and sliding windows count it
  attn_branch            int32 [B, T]    0 prompt (and padding), 1 chosen, 2 rejected
  score_index            int32 [B, 2, K] slot whose hidden state predicts completion token k:
                                         chosen k from p - 1 + k; rejected 0 from the last prompt
                                         slot p - 1 (not chosen's end), rejected k > 0 from
                                         p + c + k - 1; padding slots point at 0
  score_targets          int32 [B, 2, K] the completion tokens
  score_mask             int32 [B, 2, K] 1 on real completion tokens
plus `ref_logps` and the family's image arrays as in the two-row layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdpo.errors import DataError

LAYOUTS = ("pairs", "shared")
SHARED_KEYS = ("attn_order", "attn_branch", "score_index", "score_targets", "score_mask")
ROW_MULTIPLE = 8  # row and completion lengths are rounded up to this, so few shapes compile


def is_shared(batch: dict) -> bool:
  """Whether a batch is in the prefix-shared layout."""
  return "score_index" in batch


def round_up(n: int, multiple: int = ROW_MULTIPLE) -> int:
  return max(multiple, -(-int(n) // multiple) * multiple)


def shape_for(pairs: Sequence) -> tuple[int, int]:
  """(row length T, completion slots K) that fit every pair: one static shape for a run."""
  if not pairs:
    raise DataError("no pairs to size the shared rows from")
  length = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
  slots = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
  return round_up(length), round_up(slots)


def from_pairs(two_row: dict, prompt_lengths: Sequence[int], *, length: int, slots: int) -> dict:
  """The two-row batch ([B, 2, T2] text arrays) -> the shared layout (module docstring).

  Args:
    two_row: a batch of `pipeline.collate_pairs`, images included.
    prompt_lengths: p of each pair.
    length: T, the shared row length (>= p + c + r of every pair).
    slots: K, completion slots (>= c and r of every pair).
  """
  ids2, seg2, mask2 = two_row["input_ids"], two_row["segment_ids"], two_row["loss_mask"]
  pos2 = two_row["positions"]  # [B, 2, T2] or [B, 2, 3, T2]
  b = ids2.shape[0]
  if (np.asarray(prompt_lengths) < 1).any():
    raise DataError("a shared row needs a prompt of at least one token (it predicts the first completion token)")
  out = {k: np.zeros((b, length), np.int32) for k in ("input_ids", "segment_ids", "attn_order", "attn_branch")}
  positions = np.zeros(pos2.shape[:1] + pos2.shape[2:-1] + (length,), np.int32)
  for k in ("score_index", "score_targets", "score_mask"):
    out[k] = np.zeros((b, 2, slots), np.int32)
  for i, p in enumerate(prompt_lengths):
    n_c, n_r = (int(seg2[i, j].sum()) - p for j in (0, 1))
    if n_c + n_r + p > length or max(n_c, n_r) > slots:
      raise DataError(f"pair {i}: prompt {p} + chosen {n_c} + rejected {n_r} tokens do not fit a shared row of "
                      f"{length} tokens with {slots} completion slots")
    if not np.array_equal(ids2[i, 0, :p], ids2[i, 1, :p]) or mask2[i, :, :p].any():
      raise DataError(f"pair {i}: chosen and rejected rows do not share a {p}-token prompt")
    end_c, end = p + n_c, p + n_c + n_r
    out["input_ids"][i, :end_c] = ids2[i, 0, :end_c]
    out["input_ids"][i, end_c:end] = ids2[i, 1, p:p + n_r]
    out["segment_ids"][i, :end] = 1
    out["attn_order"][i, :end_c] = np.arange(end_c)
    out["attn_order"][i, end_c:end] = p + np.arange(n_r)
    out["attn_branch"][i, p:end_c] = 1
    out["attn_branch"][i, end_c:end] = 2
    positions[i, ..., :end_c] = pos2[i, 0, ..., :end_c]
    positions[i, ..., end_c:end] = pos2[i, 1, ..., p:p + n_r]
    # Completion token k of chosen is slot p + k, predicted from slot p + k - 1; rejected's token k
    # is slot p + c + k, predicted from p + c + k - 1, except k = 0: from the last prompt slot.
    for j, (n, start) in enumerate(((n_c, p), (n_r, end_c))):
      k = np.arange(n)
      out["score_index"][i, j, :n] = np.where(k == 0, p - 1, start + k - 1)
      out["score_targets"][i, j, :n] = out["input_ids"][i, start:start + n]
      out["score_mask"][i, j, :n] = 1
  out["positions"] = positions
  for k, v in two_row.items():
    if k not in ("input_ids", "segment_ids", "positions", "loss_mask"):
      out[k] = v  # ref_logps, images: per pair already
  return out
