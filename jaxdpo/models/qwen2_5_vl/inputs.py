"""Host-side assembly of Qwen2.5-VL model inputs (numpy), with static-shape padding.

`make_inputs` turns token ids, segment ids and the image processor's output into the dict that
`Qwen2_5_VL.hidden_states` / `prefill` take: it computes the M-RoPE positions and rope deltas,
checks that the image-pad tokens match the images, and pads the patch and image axes to fixed
sizes so that jit sees the same shapes batch after batch.
"""

from __future__ import annotations

import numpy as np

from jaxdpo.models.qwen2_5_vl import rope_index
from jaxdpo.models.qwen2_5_vl.config import Qwen2_5_VLConfig


def pad_vision(pixel_values, image_grid_thw, *, num_patches: int | None = None, num_images: int | None = None,
               merge_unit: int = 4):
  """Appends zero patches and zero grid rows.

  Args:
    pixel_values: [P, E] real patches.
    image_grid_thw: [I, 3] real grids.
    num_patches: target P (default: P rounded up to a multiple of `merge_unit`).
    num_images: target I (default: I).
    merge_unit: patches per merged token; the padded P must be a multiple of it.

  Returns:
    (pixel_values [num_patches, E] float32, image_grid_thw [num_images, 3] int32).
  """
  pixel_values = np.asarray(pixel_values, np.float32)
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  p, i = pixel_values.shape[0], grid.shape[0]
  if int(np.prod(grid, axis=1).sum()) != p:
    raise ValueError(f"image_grid_thw {grid.tolist()} describes {int(np.prod(grid, axis=1).sum())} patches, "
                     f"pixel_values has {p}")
  num_patches = -(-p // merge_unit) * merge_unit if num_patches is None else num_patches
  num_images = i if num_images is None else num_images
  if num_patches < p or num_patches % merge_unit:
    raise ValueError(f"cannot pad {p} patches to {num_patches} (must be >= {p} and a multiple of {merge_unit})")
  if num_images < i:
    raise ValueError(f"cannot pad {i} images to {num_images}")
  pixels = np.zeros((num_patches, pixel_values.shape[1]), np.float32)
  pixels[:p] = pixel_values
  grids = np.zeros((num_images, 3), np.int32)
  grids[:i] = grid
  return pixels, grids


def pack_vision(pixel_values, image_grid_thw, *, rows: int, patches_per_row: int, images_per_row: int,
                row_counts=None):
  """Packs images, in order, into `rows` rows of `patches_per_row` patches each.

  Images keep their order (row 0 takes the first ones until the next does not fit, and so on),
  which is the order their placeholders are filled in. With `row_counts`, row r takes exactly
  `row_counts[r]` images instead.

  Returns:
    (pixel_values [rows, patches_per_row, E] float32, image_grid_thw [rows, images_per_row, 3]).

  Raises:
    ValueError: if an image is larger than a row, or the images do not fit.
  """
  pixel_values = np.asarray(pixel_values, np.float32)
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  counts = np.prod(grid, axis=1)
  if int(counts.sum()) != pixel_values.shape[0]:
    raise ValueError(f"image_grid_thw describes {int(counts.sum())} patches, pixel_values has "
                     f"{pixel_values.shape[0]}")
  pixels = np.zeros((rows, patches_per_row, pixel_values.shape[1]), np.float32)
  grids = np.zeros((rows, images_per_row, 3), np.int32)
  if row_counts is not None:
    row_counts = [int(c) for c in row_counts]
    if sum(row_counts) != len(counts) or len(row_counts) > rows:
      raise ValueError(f"row_counts {row_counts} do not split {len(counts)} images into {rows} rows")
    assigned = np.repeat(np.arange(len(row_counts)), row_counts)
  row, fill, used, start = 0, 0, 0, 0
  for i, count in enumerate(counts.tolist()):
    if count > patches_per_row:
      raise ValueError(f"image {i} has {count} patches, more than patches_per_row={patches_per_row}")
    if row_counts is not None:
      if assigned[i] != row:
        row, fill, used = int(assigned[i]), 0, 0
      if fill + count > patches_per_row or used == images_per_row:
        raise ValueError(f"the {row_counts[row]} images of vision row {row} do not fit in {patches_per_row} "
                         f"patches / {images_per_row} images")
    elif fill + count > patches_per_row or used == images_per_row:
      row, fill, used = row + 1, 0, 0
    if row >= rows:
      raise ValueError(f"{len(counts)} images ({int(counts.sum())} patches) do not fit in {rows} rows of "
                       f"{patches_per_row} patches / {images_per_row} images")
    pixels[row, fill:fill + count] = pixel_values[start:start + count]
    grids[row, used] = grid[i]
    fill, used, start = fill + count, used + 1, start + count
  return pixels, grids


def make_inputs(cfg: Qwen2_5_VLConfig, input_ids, segment_ids, pixel_values=None, image_grid_thw=None, *,
                num_patches: int | None = None, num_images: int | None = None,
                vision_rows: int | None = None, vision_row=None) -> dict[str, np.ndarray]:
  """Builds the model's input dict.

  Args:
    cfg: the model config (token ids, merge size).
    input_ids, segment_ids: int [B, T] (segment 0 = padding; left or right).
    pixel_values, image_grid_thw: the image processor's output for all images of the batch in
      order of appearance, or None for a text-only batch.
    num_patches, num_images: static sizes to pad the vision inputs to (see `pad_vision`); per
      row when `vision_rows` is set.
    vision_rows: if set, pack the images into this many rows (see `pack_vision`); then
      `num_patches` and `num_images` are required.
    vision_row: optional int [B]: text rows that share their images (a DPO pair's chosen and
      rejected) name the same vision row. The images are then given once per vision row, in
      vision-row order; vision row r holds them (padded to `num_patches` / `num_images`) and
      text row b reads its placeholders from vision row `vision_row[b]`. The vision tower thus
      runs once per shared image set, and vision rows can be sharded along with text rows.

  Returns:
    dict with `input_ids`, `segment_ids`, `positions` [3, B, T], `rope_deltas` [B, 1] and,
    with images, `pixel_values` and `image_grid_thw` (padded).

  Raises:
    ValueError: if the image-pad tokens do not match the images.
  """
  input_ids = np.asarray(input_ids)
  segment_ids = np.asarray(segment_ids)
  if input_ids.shape != segment_ids.shape:
    raise ValueError(f"input_ids {input_ids.shape} and segment_ids {segment_ids.shape} differ in shape")
  m = cfg.vision.spatial_merge_size
  if np.any((input_ids == cfg.video_token_id) & (segment_ids != 0)):
    raise ValueError("video inputs are not supported yet (found video-pad tokens)")
  index = lambda ids, seg, grid: rope_index.get_rope_index(
      ids, seg, grid, spatial_merge_size=m, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      tokens_per_second=cfg.vision.tokens_per_second)
  if vision_row is not None:
    return _shared_image_inputs(cfg, input_ids, segment_ids, pixel_values, image_grid_thw, np.asarray(vision_row),
                                index, num_patches=num_patches, num_images=num_images, vision_rows=vision_rows)
  positions, deltas = index(input_ids, segment_ids, image_grid_thw)
  out = {"input_ids": input_ids.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
         "positions": positions, "rope_deltas": deltas}
  if image_grid_thw is not None and len(image_grid_thw):
    if vision_rows is None:
      pixels, grids = pad_vision(pixel_values, image_grid_thw, num_patches=num_patches, num_images=num_images,
                                 merge_unit=m * m)
    else:
      if num_patches is None or num_images is None or num_patches % (m * m):
        raise ValueError(f"packing into vision_rows needs num_patches (a multiple of {m * m}) and num_images")
      pixels, grids = pack_vision(pixel_values, image_grid_thw, rows=vision_rows, patches_per_row=num_patches,
                                  images_per_row=num_images)
    out["pixel_values"], out["image_grid_thw"] = pixels, grids
  return out


def _image_runs(ids_row, seg_row, image_token_id: int) -> int:
  """Number of images (runs of placeholder tokens) among the real tokens of one row."""
  is_image = ids_row[seg_row != 0] == image_token_id
  return int(np.sum(is_image[1:] & ~is_image[:-1]) + (is_image[:1].sum()))


def _shared_image_inputs(cfg, input_ids, segment_ids, pixel_values, image_grid_thw, vision_row, index, *,
                         num_patches, num_images, vision_rows):
  """`make_inputs` for text rows that read their images from named vision rows."""
  b = input_ids.shape[0]
  if vision_row.shape != (b,):
    raise ValueError(f"vision_row must have one entry per text row ({b}), got shape {vision_row.shape}")
  rows = int(vision_rows or vision_row.max() + 1)
  if num_patches is None or num_images is None:
    raise ValueError("vision_row needs num_patches and num_images (per vision row)")
  grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
  per_row: list[int | None] = [None] * rows
  for i, r in enumerate(vision_row.tolist()):
    runs = _image_runs(input_ids[i], segment_ids[i], cfg.image_token_id)
    if per_row[r] is not None and per_row[r] != runs:
      raise ValueError(f"text rows sharing vision row {r} hold different numbers of images ({per_row[r]} and {runs})")
    per_row[r] = runs
  counts = [c or 0 for c in per_row]
  if sum(counts) != len(grid):
    raise ValueError(f"the text rows need {sum(counts)} images (per vision row: {counts}), got {len(grid)} grids")
  grids_of_row = np.split(grid, np.cumsum(counts)[:-1])
  positions = np.zeros((3,) + input_ids.shape, np.int32)
  deltas = np.zeros((b, 1), np.int32)
  for i, r in enumerate(vision_row.tolist()):
    positions[:, i:i + 1], deltas[i:i + 1] = index(input_ids[i:i + 1], segment_ids[i:i + 1], grids_of_row[r])
  pixels, grids = pack_vision(pixel_values if len(grid) else np.zeros((0, cfg.vision.patch_dim)), grid, rows=rows,
                              patches_per_row=num_patches, images_per_row=num_images, row_counts=counts)
  return {"input_ids": input_ids.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
          "positions": positions, "rope_deltas": deltas, "pixel_values": pixels, "image_grid_thw": grids,
          "vision_row": vision_row.astype(np.int32)}
