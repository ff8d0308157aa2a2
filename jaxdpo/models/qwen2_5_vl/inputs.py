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


def make_inputs(cfg: Qwen2_5_VLConfig, input_ids, segment_ids, pixel_values=None, image_grid_thw=None, *,
                num_patches: int | None = None, num_images: int | None = None) -> dict[str, np.ndarray]:
  """Builds the model's input dict.

  Args:
    cfg: the model config (token ids, merge size).
    input_ids, segment_ids: int [B, T] (segment 0 = padding; left or right).
    pixel_values, image_grid_thw: the image processor's output for all images of the batch in
      order of appearance, or None for a text-only batch.
    num_patches, num_images: static sizes to pad the vision inputs to (see `pad_vision`).

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
  positions, deltas = rope_index.get_rope_index(
      input_ids, segment_ids, image_grid_thw, spatial_merge_size=m, image_token_id=cfg.image_token_id,
      video_token_id=cfg.video_token_id, tokens_per_second=cfg.vision.tokens_per_second)
  out = {"input_ids": input_ids.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
         "positions": positions, "rope_deltas": deltas}
  if image_grid_thw is not None and len(image_grid_thw):
    pixels, grids = pad_vision(pixel_values, image_grid_thw, num_patches=num_patches, num_images=num_images,
                               merge_unit=m * m)
    out["pixel_values"], out["image_grid_thw"] = pixels, grids
  return out
