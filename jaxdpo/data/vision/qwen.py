"""Qwen2.5-VL (and Nanonets-OCR2) images in the jobs' data path.

Prompt: the chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image; the
`<|image_pad|>` is repeated grid_t*grid_h*grid_w / merge^2 times, as transformers'
`Qwen2_5_VLProcessor.replace_image_token` does (that processor cannot be built without
torchvision's video processor, so its one-line expansion is mirrored here and held to it by
`tests/test_vision_data.py`). Pixels come from transformers' `Qwen2VLImageProcessorPil`
(`jaxdpo.data.vision.images`), configured from the tokenizer directory's preprocessor_config.json.

Batch arrays (per record, leading batch axis B):
  pixel_values   float32 [B, P, E]  the record's patches in order, zero rows up to P =
                                    the budget's max_patches (one vision row per record/pair)
  image_grid_thw int32 [B, I, 3]    their grids, zero rows up to I = max_images
  positions      int32 [B, 2, 3, T] (pairs) or [B, 3, T]: M-RoPE positions of every text row,
                                    from the family's `row_positions`, on the host
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from jaxdpo.data.vision import images as images_lib
from jaxdpo.data.vision.adapters import Budget, DataError, VisionAdapter


# Preprocessed images kept per adapter, by path: a training run collates every image once per epoch, and
# the image processor costs more than a small model's step (the demo's pages: ~5 ms each, 2-core box).
PIXEL_CACHE_BYTES = 512 << 20


class QwenVLAdapter(VisionAdapter):
  """Images for the `qwen2_5_vl` family."""

  uses_patches = True

  def __init__(self, family, model_cfg, tok, tokenizer_dir: str, requested: Budget):
    super().__init__(family, model_cfg, tok, tokenizer_dir, requested)
    self.placeholder_token = self.token_string(model_cfg.image_token_id, "image")
    self._start = self.token_string(model_cfg.vision_start_token_id, "vision-start")
    self._end = self.token_string(model_cfg.vision_end_token_id, "vision-end")
    self.processor = self._image_processor()
    self._pixel_cache: collections.OrderedDict = collections.OrderedDict()
    self._pixel_cache_bytes = 0

  def _image_processor(self):
    v = self.model_cfg.vision
    want = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    from_dir = self.preprocessor_dir()
    proc = images_lib.qwen_image_processor(from_dir, **({} if from_dir else want))
    wrong = {k: (getattr(proc, k), w) for k, w in want.items() if getattr(proc, k) != w}
    if wrong:
      raise DataError(f"{self.tokenizer_dir}/preprocessor_config.json disagrees with the model's vision tower: "
                      + ", ".join(f"{k}={a} (model: {b})" for k, (a, b) in wrong.items()))
    return proc

  def plain_placeholder(self) -> str:
    return self._start + self.placeholder_token + self._end

  def expansion(self, num_tokens: int) -> str:
    return self.placeholder_token * num_tokens

  def measure(self, path: str) -> tuple[int, int]:
    pil, name = images_lib.load_image(path)
    width, height = images_lib.qwen_image_size(pil, name)
    try:
      patches = int(self.processor.get_number_of_image_patches(height, width))
    except Exception as e:  # transformers' smart_resize raises ValueError for unusable sizes
      raise images_lib.ImageError(f"{name}: image preprocessing failed ({type(e).__name__}: {e})") from e
    return patches // self.model_cfg.vision.merge_unit, patches

  def round_budget(self, budget: Budget) -> Budget:
    unit = self.model_cfg.vision.merge_unit
    return Budget(budget.max_images, -(-budget.max_patches // unit) * unit)

  def _image_inputs(self, images: Sequence) -> dict:
    """`images_lib.qwen_image_inputs` of one record's images, from a bounded LRU cache when they are
    paths (files are taken as unchanged during a run; in-memory images are not cached)."""
    if not all(isinstance(x, str) for x in images):
      return images_lib.qwen_image_inputs(images, self.processor)
    key = tuple(images)
    hit = self._pixel_cache.get(key)
    if hit is not None:
      self._pixel_cache.move_to_end(key)
      return hit
    vis = images_lib.qwen_image_inputs(images, self.processor)
    size = sum(v.nbytes for v in vis.values())
    if size <= PIXEL_CACHE_BYTES:
      self._pixel_cache[key] = vis
      self._pixel_cache_bytes += size
      while self._pixel_cache_bytes > PIXEL_CACHE_BYTES:
        _, old = self._pixel_cache.popitem(last=False)
        self._pixel_cache_bytes -= sum(v.nbytes for v in old.values())
    return vis

  def collate(self, examples: Sequence, text: dict, *, pairs: bool) -> dict:
    b = self.budget
    if b is None or b.max_images == 0:
      return {}
    cfg, v = self.model_cfg, self.model_cfg.vision
    ids, seg = text["input_ids"], text["segment_ids"]
    n = len(examples)
    pixels = np.zeros((n, b.max_patches, v.patch_dim), np.float32)
    grids = np.zeros((n, b.max_images, 3), np.int32)
    rows = 2 if pairs else 1
    t = ids.shape[-1]
    positions = np.zeros((n, rows, 3, t), np.int32)
    for i, e in enumerate(examples):
      self.check_budget(e, len(e.images), sum(e.image_units))
      grid = np.zeros((0, 3), np.int64)
      if e.images:
        vis = self._image_inputs(e.images)
        if tuple(int(x) for x in vis["num_image_tokens"]) != tuple(e.image_tokens):
          raise DataError(f"{e.where}: field 'images': the image processor gave {vis['num_image_tokens'].tolist()} "
                          f"image tokens, the tokenized prompt holds {list(e.image_tokens)}")
        grid = vis["image_grid_thw"]
        pixels[i, :vis["pixel_values"].shape[0]] = vis["pixel_values"]
        grids[i, :grid.shape[0]] = grid
      for j in range(rows):
        row_ids = ids[i, j] if pairs else ids[i]
        row_seg = seg[i, j] if pairs else seg[i]
        positions[i, j] = self.family.row_positions(cfg, row_ids, row_seg, grid)
    return {"pixel_values": pixels, "image_grid_thw": grids,
            "positions": positions if pairs else positions[:, 0]}
