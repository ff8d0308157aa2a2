"""Host-side (numpy) M-RoPE position ids for Qwen2.5-VL.

A port of the semantics of transformers' `Qwen2_5_VLModel.get_rope_index`: text tokens advance one
position per token on all three streams (temporal, height, width); the tokens of one image or
video get a 3D grid of positions starting at the current position, and the text after it resumes
at `start + max(h, w) / merge`. Padding (segment id 0) is skipped and keeps position 0.

`rope_deltas` [B, 1] is `max position + 1 - number of real tokens`; during decoding the position
of the k-th generated token (k = 0, 1, ...) is `real_length + k + rope_deltas` on all three streams.

Positions are computed on the host because they depend on the data-dependent layout of image
tokens; the model receives them as `positions` [3, B, T].

Beyond transformers, rows may be packed: each distinct non-zero segment id of a row restarts
positions at 0 (rope_deltas then describes the row's last segment).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int | None = None) -> np.ndarray:
  """0 for text, 1 for image placeholders, 2 for video placeholders (transformers' mm_token_type_ids)."""
  types = np.where(input_ids == image_token_id, IMAGE, TEXT)
  if video_token_id is not None:
    types = np.where(input_ids == video_token_id, VIDEO, types)
  return types.astype(np.int32)


def vision_positions(start: int, grid_thw, spatial_merge_size: int, time_interval: float = 1.0) -> np.ndarray:
  """3D positions [3, t * h/m * w/m] of one image or video starting at position `start`."""
  t, h, w = (int(x) for x in grid_thw)
  lh, lw = h // spatial_merge_size, w // spatial_merge_size
  # The temporal index is scaled and truncated before the offset is added, as in transformers.
  temporal = (np.arange(t) * time_interval).astype(np.int64) + start
  grid = np.meshgrid(temporal, np.arange(lh) + start, np.arange(lw) + start, indexing="ij")
  return np.stack([g.reshape(-1) for g in grid])


def get_rope_index(input_ids, segment_ids=None, image_grid_thw=None, *, spatial_merge_size: int,
                   image_token_id: int, video_token_id: int | None = None, video_grid_thw=None,
                   second_per_grid_ts=None, tokens_per_second: int = 2, mm_token_type_ids=None):
  """M-RoPE position ids and rope deltas for a batch.

  Args:
    input_ids: int [B, T].
    segment_ids: int [B, T]; 0 = padding (left or right), equal non-zero ids = one sequence.
      Default: every token is real (one segment). An attention mask (1/0) works as well.
    image_grid_thw: int [I, 3] grids of the batch's images in order of appearance (row-major
      over the batch); zero rows (padding for static shapes) are allowed at the end.
    spatial_merge_size: the vision tower's merge size (2).
    image_token_id, video_token_id: placeholder ids; used when `mm_token_type_ids` is None.
    video_grid_thw, second_per_grid_ts: videos and their seconds per temporal grid step.
    tokens_per_second: temporal positions per second of video.
    mm_token_type_ids: optional int [B, T] (0 text, 1 image, 2 video), as transformers' processor
      emits; derived from the placeholder ids otherwise.

  Returns:
    (positions int32 [3, B, T], rope_deltas int32 [B, 1]).

  Raises:
    ValueError: when the placeholders do not match the grids (wrong token count, too few or
      unused grids).
  """
  input_ids = np.asarray(input_ids)
  b, t = input_ids.shape
  seg = np.ones((b, t), np.int32) if segment_ids is None else np.asarray(segment_ids)
  types = (token_types(input_ids, image_token_id, video_token_id) if mm_token_type_ids is None
           else np.asarray(mm_token_type_ids))
  grids = {IMAGE: _grid_iter(image_grid_thw), VIDEO: _grid_iter(video_grid_thw)}
  seconds = iter([] if second_per_grid_ts is None else np.asarray(second_per_grid_ts).tolist())
  positions = np.zeros((3, b, t), np.int64)
  deltas = np.zeros((b, 1), np.int64)
  for row in range(b):
    for segment in _segments(seg[row]):
      cols = np.nonzero(seg[row] == segment)[0]
      pos = _segment_positions(types[row, cols], grids, seconds, spatial_merge_size, tokens_per_second, row)
      positions[:, row, cols] = pos
      deltas[row, 0] = pos.max() + 1 - len(cols)
  for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
    left = [g for g in grids[kind] if np.prod(g) > 0]
    if left:
      raise ValueError(f"{len(left)} {name} grid(s) have no placeholder tokens in input_ids: {left}")
  return positions.astype(np.int32), deltas.astype(np.int32)


def _grid_iter(grid_thw) -> Iterator[tuple[int, int, int]]:
  if grid_thw is None:
    return iter(())
  return iter([tuple(int(x) for x in g) for g in np.asarray(grid_thw).reshape(-1, 3)])


def _segments(seg_row: np.ndarray) -> list[int]:
  """Distinct non-zero segment ids in order of first appearance."""
  seen = []
  for s in seg_row.tolist():
    if s != 0 and s not in seen:
      seen.append(s)
  return seen


def _segment_positions(types: np.ndarray, grids, seconds, merge: int, tokens_per_second: int, row: int):
  pieces, current = [], 0
  for kind, group in itertools.groupby(types.tolist()):
    n = len(list(group))
    if kind == TEXT:
      pieces.append(np.broadcast_to(np.arange(n) + current, (3, n)))
      current += n
      continue
    name = "image" if kind == IMAGE else "video"
    grid = next(grids[kind], None)
    if grid is None or np.prod(grid) == 0:
      raise ValueError(f"row {row}: a run of {n} {name} placeholder tokens has no {name}_grid_thw entry left")
    expected = grid[0] * grid[1] * grid[2] // merge ** 2
    if n != expected:
      raise ValueError(f"row {row}: {n} consecutive {name} placeholder tokens, but grid {grid} needs {expected} "
                       f"(t*h*w/{merge ** 2}); was the sequence truncated inside an image?")
    interval = 1.0
    if kind == VIDEO:
      # Stills have no time axis; videos space temporal positions by their frame rate.
      interval = tokens_per_second * next(seconds, 1.0)
    pieces.append(vision_positions(current, grid, merge, interval))
    current += max(grid[1], grid[2]) // merge
  return np.concatenate(pieces, axis=1)

