"""Gemma 3 image preprocessing (transformers' PIL backend)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jaxdpo.data.vision import images


def _image(w, h, seed=0):
  return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


def _reference(pil, side):
  """Independent computation of gemma-3-4b-it's preprocessing: bilinear resize, /255, (x-0.5)/0.5."""
  x = np.asarray(pil.convert("RGB").resize((side, side), Image.BILINEAR), np.float32) / 255.0
  return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def test_default_is_896_square_without_pan_and_scan():
  out = images.gemma3_image_inputs([_image(120, 50), _image(31, 77, seed=1)])
  assert out["pixel_values"].shape == (2, 3, 896, 896) and out["pixel_values"].dtype == np.float32
  assert out["num_crops"].tolist() == [0, 0]
  np.testing.assert_allclose(out["pixel_values"][1], _reference(_image(31, 77, seed=1), 896), atol=1e-6)


def test_pan_and_scan_adds_crops_after_each_image():
  wide = _image(900, 300)
  out = images.gemma3_image_inputs([wide, _image(300, 300, seed=2)], do_pan_and_scan=True,
                                   size={"height": 56, "width": 56})
  # 3:1 -> three 300 px crops (>= 256 px) after the whole image; the square image gets none.
  assert out["num_crops"].tolist() == [3, 0]
  assert out["pixel_values"].shape == (5, 3, 56, 56)
  np.testing.assert_allclose(out["pixel_values"][0], _reference(wide, 56), atol=1e-6)
  np.testing.assert_allclose(out["pixel_values"][1], _reference(wide.crop((0, 0, 300, 300)), 56), atol=1e-6)
  off = images.gemma3_image_inputs([wide], size={"height": 56, "width": 56})
  assert off["num_crops"].tolist() == [0] and off["pixel_values"].shape == (1, 3, 56, 56)


def test_model_dir_config_is_used(tmp_path):
  cfg = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 27, "width": 27}, "resample": 2,
         "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_resize": True, "do_pan_and_scan": None,
         "pan_and_scan_min_crop_size": None, "pan_and_scan_max_num_crops": None,
         "pan_and_scan_min_ratio_to_activate": None}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
  proc = images.gemma3_image_processor(str(tmp_path))
  out = images.gemma3_image_inputs([_image(40, 30)], proc)
  assert out["pixel_values"].shape == (1, 3, 27, 27)
  assert images.gemma3_image_inputs([_image(90, 30)], proc, do_pan_and_scan=True)["num_crops"].tolist() == [0]


def test_errors_name_the_image(tmp_path):
  with pytest.raises(images.ImageError, match="missing.png"):
    images.gemma3_image_inputs([str(tmp_path / "missing.png")])
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(images.ImageError, match="bad.png"):
    images.gemma3_image_inputs([str(bad)])
