"""Gemma 3 images in the jobs' data path.

Prompt: the chat template writes `<start_of_image>` (boi) per image; each becomes
"\\n\\n" + boi + mm_tokens_per_image x `<image_soft_token>` + eoi + "\\n\\n", the expansion of
transformers' `Gemma3Processor` (held to it by `tests/test_vision_data.py`). Pixels come from
transformers' `Gemma3ImageProcessorPil` (`jaxdpo.data.vision.images`). Pan-and-scan crops are not
supported by the jobs (refused).

Batch arrays (per record, leading batch axis B):
  pixel_values float32 [B, I, 3, S, S]  the record's images, zero images up to I = max_images
  num_images   int32 [B]                how many of them are real
Text positions stay 1D ([B, 2, T] or [B, T]), as for the text model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdpo.data.vision import images as images_lib
from jaxdpo.data.vision.adapters import Budget, DataError, VisionAdapter


class Gemma3Adapter(VisionAdapter):
  """Images for the `gemma3` family."""

  def __init__(self, family, model_cfg, tok, tokenizer_dir: str, requested: Budget):
    super().__init__(family, model_cfg, tok, tokenizer_dir, requested)
    self.placeholder_token = self.token_string(model_cfg.boi_token_id, "begin-of-image")
    self._eoi = self.token_string(model_cfg.eoi_token_id, "end-of-image")
    self._image = self.token_string(model_cfg.image_token_id, "image")
    self.processor = self._image_processor()

  def _image_processor(self):
    side = self.model_cfg.vision.image_size
    from_dir = self.preprocessor_dir()
    proc = (images_lib.gemma3_image_processor(from_dir) if from_dir else
            images_lib.gemma3_image_processor(size={"height": side, "width": side}))
    size = (proc.size["height"], proc.size["width"])
    if size != (side, side):
      raise DataError(f"{self.tokenizer_dir}/preprocessor_config.json resizes images to {size[0]}x{size[1]}, but the "
                      f"model's vision tower takes {side}x{side}")
    if proc.do_pan_and_scan:
      raise DataError(f"{self.tokenizer_dir}/preprocessor_config.json turns pan-and-scan on; the jobs do not support "
                      "its extra crops yet (set do_pan_and_scan to false)")
    return proc

  def plain_placeholder(self) -> str:
    return self.placeholder_token

  def expansion(self, num_tokens: int) -> str:
    return f"\n\n{self.placeholder_token}{self._image * num_tokens}{self._eoi}\n\n"

  def measure(self, path: str) -> tuple[int, int]:
    images_lib.image_size(*images_lib.load_image(path))
    return self.model_cfg.mm_tokens_per_image, 1

  def collate(self, examples: Sequence, text: dict, *, pairs: bool) -> dict:
    del text, pairs  # positions stay 1D; pairs share their images through the family's image_index
    b = self.budget
    if b is None or b.max_images == 0:
      return {}
    side = self.model_cfg.vision.image_size
    n = len(examples)
    pixels = np.zeros((n, b.max_images, 3, side, side), np.float32)
    counts = np.zeros((n,), np.int32)
    for i, e in enumerate(examples):
      self.check_budget(e, len(e.images), len(e.images))
      if e.images:
        vis = images_lib.gemma3_image_inputs(e.images, self.processor, do_pan_and_scan=False)
        pixels[i, :len(e.images)] = vis["pixel_values"]
        counts[i] = len(e.images)
    return {"pixel_values": pixels, "num_images": counts}
