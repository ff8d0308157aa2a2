"""Packed prefix-shared pairs (`data.pack_tokens`): several [P | C | R] pairs per row, up to a budget.

Built on the host from the two-row batch of `pipeline.collate_pairs`, like the shared layout
(`jaxdpo.data.shared_rows`), and with the same per-token values; pairs are placed first-fit in
decreasing length into rows of `pack_tokens` slots. Every leaf leads with the packed-row axis R, so
the batch sharding and micro-batching split rows, and each pair travels with its row.

Batch arrays:
  input_ids, positions, attn_order, attn_branch  int32 [R, T]  as in the shared layout, per pair
  segment_ids   int32 [R, T]  1 + the pair's slot in its row (0 = padding): pairs never see each other
  pack_count    int32 [R]     pairs in the row (its presence marks the packed layout)
  score_index   int32 [R, Q]  slot predicting each completion token of the row (shared-layout rule)
  score_targets int32 [R, Q]  the completion tokens
  score_slot    int32 [R, Q]  2 * pair slot + (0 chosen, 1 rejected)
  score_rank    int32 [R, Q]  the token's index in its completion (LD-DPO)
  score_mask    int32 [R, Q]  1 on real completion tokens
  pair_valid    int32 [R, M]  1 on the M pair slots that hold a pair
  ref_logps     fp32  [R, M, 2] optional
  images        the family's per-pair image arrays with the pair slot axis added: [R, M, ...]
                (Qwen2.5-VL pixel_values [R, M, P, E], image_grid_thw [R, M, I, 3]; Gemma 3
                pixel_values [R, M, I, 3, S, S], num_images [R, M]); an empty slot holds no image
A pair's positions are its two-row positions, as in the shared layout: 1D, or Qwen2.5-VL's M-RoPE
positions [R, 3, T], whose completions continue from the prompt's rope_deltas. Its image
placeholders sit in its prompt, once, and read its own slot's features (`jaxdpo.models.splice`);
Gemma 3's bidirectional image groups are runs within the pair's segment.
Shapes come from a small fixed set so compiles stay bounded: T = pack_tokens, R a power of two
times `row_multiple` (the batch devices x micro-batches, so rows split evenly), Q one of
T/8, T/4, T/2, T and M a power of two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdpo.data import shared_rows
from jaxdpo.errors import DataError

TEXT = ("input_ids", "segment_ids", "positions", "loss_mask", "ref_logps")


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def bucket_tokens(n: int, budget: int) -> int:
  """Smallest of budget/8, budget/4, budget/2, budget (rounded up to 8) holding n."""
  for part in (8, 4, 2, 1):
    q = shared_rows.round_up(-(-budget // part))
    if n <= q:
      return q
  raise DataError(f"{n} completion tokens do not fit a packed row of {budget}")


def assign(lengths: Sequence[int], budget: int) -> list[list[int]]:
  """First-fit decreasing: pair indices per row, each row's total length <= budget."""
  rows, free = [], []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if lengths[i] > budget:
      raise DataError(f"pair {i}: {lengths[i]} tokens (prompt + chosen + rejected) exceed data.pack_tokens={budget}")
    for r, room in enumerate(free):
      if lengths[i] <= room:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(budget - lengths[i])
  return [sorted(r) for r in rows]


def pack(two_row: dict, prompt_lengths: Sequence[int], *, pack_tokens: int, row_multiple: int = 1) -> dict:
  """The two-row batch -> packed rows (module docstring)."""
  images = sorted(k for k in two_row if k not in TEXT)  # per pair, leading pair axis (the family's layout)
  seg2, ids2, pos2 = two_row["segment_ids"], two_row["input_ids"], two_row["positions"]
  t = shared_rows.round_up(pack_tokens)
  sizes = [(int(p), int(seg2[i, 0].sum()) - p, int(seg2[i, 1].sum()) - p) for i, p in enumerate(prompt_lengths)]
  if any(p < 1 for p, _, _ in sizes):
    raise DataError("a packed pair needs a prompt of at least one token (it predicts the first completion token)")
  rows = assign([p + c + r for p, c, r in sizes], t)
  n_rows = row_multiple * _pow2_at_least(-(-len(rows) // row_multiple))
  m = _pow2_at_least(max(len(r) for r in rows))
  q = bucket_tokens(max(sum(sizes[i][1] + sizes[i][2] for i in r) for r in rows), t)
  out = {k: np.zeros((n_rows, t), np.int32) for k in ("input_ids", "segment_ids", "attn_order", "attn_branch")}
  out["positions"] = np.zeros((n_rows,) + pos2.shape[2:-1] + (t,), np.int32)  # [R, T], or [R, 3, T] (M-RoPE)
  for k in images:  # pair slot j of row r holds its pair's images; empty slots hold zeros (no images)
    out[k] = np.zeros((n_rows, m) + two_row[k].shape[1:], two_row[k].dtype)
  for k in ("score_index", "score_targets", "score_slot", "score_rank", "score_mask"):
    out[k] = np.zeros((n_rows, q), np.int32)
  out["pack_count"] = np.zeros((n_rows,), np.int32)
  out["pair_valid"] = np.zeros((n_rows, m), np.int32)
  if "ref_logps" in two_row:
    out["ref_logps"] = np.zeros((n_rows, m, 2), np.float32)
  for row, members in enumerate(rows):
    at, qa = 0, 0
    out["pack_count"][row] = len(members)
    for slot, i in enumerate(members):
      p, c, r = sizes[i]
      if not np.array_equal(ids2[i, 0, :p], ids2[i, 1, :p]):
        raise DataError(f"pair {i}: chosen and rejected rows do not share a {p}-token prompt")
      end_c, end = at + p + c, at + p + c + r
      out["input_ids"][row, at:end_c] = ids2[i, 0, :p + c]
      out["input_ids"][row, end_c:end] = ids2[i, 1, p:p + r]
      out["segment_ids"][row, at:end] = slot + 1
      out["positions"][row, ..., at:end_c] = pos2[i, 0, ..., :p + c]
      out["positions"][row, ..., end_c:end] = pos2[i, 1, ..., p:p + r]
      out["attn_order"][row, at:end_c] = np.arange(p + c)
      out["attn_order"][row, end_c:end] = p + np.arange(r)
      out["attn_branch"][row, at + p:end_c] = 1
      out["attn_branch"][row, end_c:end] = 2
      for j, (n, start) in enumerate(((c, at + p), (r, end_c))):
        k = np.arange(n)
        out["score_index"][row, qa:qa + n] = np.where(k == 0, at + p - 1, start + k - 1)
        out["score_targets"][row, qa:qa + n] = out["input_ids"][row, start:start + n]
        out["score_slot"][row, qa:qa + n] = 2 * slot + j
        out["score_rank"][row, qa:qa + n] = k
        out["score_mask"][row, qa:qa + n] = 1
        qa += n
      out["pair_valid"][row, slot] = 1
      if "ref_logps" in two_row:
        out["ref_logps"][row, slot] = two_row["ref_logps"][i]
      for k in images:
        out[k][row, slot] = two_row[k][i]
      at = end
  return out

