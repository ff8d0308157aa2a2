"""Image preprocessing through transformers' own image processors (PIL backends, no torchvision).

Each family has a self-contained section. Errors name the offending image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxdpo.errors import ImageError  # noqa: F401  (raised here; kept importable from here)


def load_image(image, name: str | None = None) -> tuple[Image.Image, str]:
  """Opens a path (or passes a PIL image through); returns (RGB-convertible image, its name)."""
  if isinstance(image, Image.Image):
    return image, name or getattr(image, "filename", "") or "<PIL image>"
  if hasattr(image, "image_bytes"):  # `records.InlineImage`: bytes stored in the record
    import io
    try:
      with Image.open(io.BytesIO(image.image_bytes)) as im:
        im.load()
        return im.copy(), image.name
    except Exception as e:  # noqa: BLE001  (PIL raises several types for undecodable bytes)
      raise ImageError(f"{image.name}: cannot decode image bytes ({type(e).__name__}: {e})") from e
  path = os.fspath(image)
  try:
    with Image.open(path) as im:
      im.load()
      return im.copy(), path
  except FileNotFoundError as e:
    raise ImageError(f"{path}: image file not found") from e
  except Exception as e:  # PIL raises several types for unreadable / truncated files
    raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def image_size(pil: Image.Image, name: str) -> tuple[int, int]:
  """(width, height) of an image, refusing an empty one by name."""
  width, height = pil.size
  if min(width, height) < 1:
    raise ImageError(f"{name}: empty image ({width}x{height})")
  return width, height


# ----------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL (Nanonets-OCR2)

QWEN_MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses anything more elongated


def qwen_image_size(pil: Image.Image, name: str) -> tuple[int, int]:
  """(width, height) of an image Qwen2-VL's processor accepts: not empty, aspect ratio <= 200."""
  width, height = image_size(pil, name)
  ratio = max(width, height) / min(width, height)
  if ratio > QWEN_MAX_ASPECT_RATIO:
    raise ImageError(f"{name}: aspect ratio {ratio:.1f} ({width}x{height}) exceeds {QWEN_MAX_ASPECT_RATIO}, "
                     "the most Qwen2-VL's image processor accepts; crop or split the image")
  return width, height


def qwen_image_processor(model_dir: str | None = None, **overrides):
  """transformers' `Qwen2VLImageProcessorPil`, from a model directory's preprocessor_config.json
  when given, else with transformers' defaults; `overrides` (e.g. min_pixels, max_pixels,
  patch_size, merge_size) win over both."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  if model_dir is not None and os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
    return Qwen2VLImageProcessorPil.from_pretrained(model_dir, **overrides)
  return Qwen2VLImageProcessorPil(**overrides)


def qwen_image_inputs(images: Sequence, processor=None, *, names: Sequence[str] | None = None,
                      **processor_kwargs) -> dict[str, np.ndarray]:
  """Turns images into Qwen2.5-VL vision inputs with transformers' processor (smart_resize,
  min/max pixels, normalisation, patch flattening).

  Args:
    images: PIL images or paths, in the order their placeholders appear in the batch.
    processor: a `Qwen2VLImageProcessorPil` (default: `qwen_image_processor(**processor_kwargs)`).
    names: optional display names for in-memory images, used in error messages.
    **processor_kwargs: passed to `qwen_image_processor` when `processor` is None.

  Returns:
    {"pixel_values": float32 [P, C * t * p * p], "image_grid_thw": int64 [I, 3]} for all images,
    concatenated; "num_image_tokens": int64 [I] merged tokens (image-pad tokens) per image.

  Raises:
    ImageError: naming the image that is missing, unreadable, degenerate, or whose aspect ratio
      exceeds 200.
  """
  processor = processor or qwen_image_processor(**processor_kwargs)
  pixels, grids = [], []
  for i, image in enumerate(images):
    pil, name = load_image(image, names[i] if names else None)
    qwen_image_size(pil, name)
    try:
      out = processor(images=[pil.convert("RGB")], return_tensors="np")
    except Exception as e:
      raise ImageError(f"{name}: image preprocessing failed ({type(e).__name__}: {e})") from e
    pixels.append(np.asarray(out["pixel_values"], np.float32))
    grids.append(np.asarray(out["image_grid_thw"], np.int64))
  merge = processor.merge_size
  if not pixels:
    patch_dim = 3 * processor.temporal_patch_size * processor.patch_size ** 2
    return {"pixel_values": np.zeros((0, patch_dim), np.float32), "image_grid_thw": np.zeros((0, 3), np.int64),
            "num_image_tokens": np.zeros((0,), np.int64)}
  grid = np.concatenate(grids, axis=0)
  return {"pixel_values": np.concatenate(pixels, axis=0), "image_grid_thw": grid,
          "num_image_tokens": grid.prod(axis=1) // merge ** 2}


# ----------------------------------------------------------------------------------------------
# Gemma 3 (gemma-3-4b-it)

# google/gemma-3-4b-it's preprocessor_config.json: 896 px squares, bilinear resampling, x / 255,
# mean = std = 0.5, pan-and-scan off. Its pan-and-scan fields are null there; when switched on
# they take Gemma3Processor's defaults (crops of at least 256 px, at most 4, from ratio 1.2).
GEMMA3_IMAGE_DEFAULTS = dict(size={"height": 896, "width": 896}, resample=2, rescale_factor=1 / 255,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pan_and_scan=False)
GEMMA3_PAN_AND_SCAN_DEFAULTS = dict(pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                                    pan_and_scan_min_ratio_to_activate=1.2)


def gemma3_image_processor(model_dir: str | None = None, **overrides):
  """transformers' `Gemma3ImageProcessorPil`, from a model directory's preprocessor_config.json
  when given, else with gemma-3-4b-it's values; `overrides` win over both."""
  from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
  if model_dir is not None and os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
    processor = Gemma3ImageProcessorPil.from_pretrained(model_dir, **overrides)
  else:
    processor = Gemma3ImageProcessorPil(**{**GEMMA3_IMAGE_DEFAULTS, **overrides})
  for key, value in GEMMA3_PAN_AND_SCAN_DEFAULTS.items():
    if getattr(processor, key, None) is None:
      setattr(processor, key, value)
  if processor.do_pan_and_scan is None:
    processor.do_pan_and_scan = False
  return processor


def gemma3_image_inputs(images: Sequence, processor=None, *, do_pan_and_scan: bool | None = None,
                        names: Sequence[str] | None = None, **processor_kwargs) -> dict[str, np.ndarray]:
  """Turns images into Gemma 3 vision inputs with transformers' processor (resize to a square,
  rescale, normalise; optional pan-and-scan crops).

  Args:
    images: PIL images or paths, in the order their placeholders appear in the batch.
    processor: a `Gemma3ImageProcessorPil` (default: `gemma3_image_processor(**processor_kwargs)`).
    do_pan_and_scan: overrides the processor's setting (off for gemma-3-4b-it).
    names: optional display names for in-memory images, used in error messages.
    **processor_kwargs: passed to `gemma3_image_processor` when `processor` is None.

  Returns:
    {"pixel_values": float32 [N, 3, S, S], "num_crops": int64 [I]}. Image i contributes
    1 + num_crops[i] consecutive entries (the whole image, then its crops), and its prompt needs
    one placeholder run (boi, mm_tokens_per_image image tokens, eoi) per entry, as
    `Gemma3Processor` writes them. Without pan-and-scan N == I.

  Raises:
    ImageError: naming the image that is missing, unreadable, empty, or fails preprocessing.
  """
  processor = processor or gemma3_image_processor(**processor_kwargs)
  call_kwargs = {} if do_pan_and_scan is None else {"do_pan_and_scan": do_pan_and_scan}
  pixels, crops = [], []
  for i, image in enumerate(images):
    pil, name = load_image(image, names[i] if names else None)
    image_size(pil, name)
    try:
      out = processor(images=[pil.convert("RGB")], return_tensors="np", **call_kwargs)
    except Exception as e:
      raise ImageError(f"{name}: image preprocessing failed ({type(e).__name__}: {e})") from e
    pixels.append(np.asarray(out["pixel_values"], np.float32))
    crops.append(int(np.asarray(out["num_crops"]).reshape(-1)[0]))
  if not pixels:
    side = processor.size["height"]
    return {"pixel_values": np.zeros((0, 3, side, side), np.float32), "num_crops": np.zeros((0,), np.int64)}
  return {"pixel_values": np.concatenate(pixels, axis=0), "num_crops": np.asarray(crops, np.int64)}
