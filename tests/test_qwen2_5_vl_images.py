"""Qwen image preprocessing through transformers' PIL processor, and its error messages."""

import os

import numpy as np
import pytest
from PIL import Image

import _qwen_vl_helpers as H
from jaxdpo.data.vision import images
from jaxdpo.models import io


def test_matches_transformers_processor_and_accepts_paths(tmp_path):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  pil = H.random_images()
  path = tmp_path / "b.png"
  pil[1].save(path)
  out = images.qwen_image_inputs([pil[0], str(path), pil[2]], H.tiny_processor())
  ref = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64,
                                 max_pixels=6400)(images=pil, return_tensors="np")
  np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
  np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
  assert out["pixel_values"].shape == (120 + 128 + 36, 3 * 2 * 4 * 4)
  assert out["num_image_tokens"].tolist() == [30, 32, 9]


def test_min_max_pixels_are_honoured():
  big = Image.new("RGB", (400, 300))
  out = images.qwen_image_inputs([big], H.tiny_processor())
  t, h, w = out["image_grid_thw"][0]
  assert t == 1 and (h * 4) * (w * 4) <= 80 * 80 and h % 2 == 0 and w % 2 == 0
  default = images.qwen_image_inputs([big])  # transformers' defaults: 14-pixel patches
  assert default["pixel_values"].shape[1] == 3 * 2 * 14 * 14
  assert default["image_grid_thw"][0].tolist() == [1, 22, 28]  # smart_resize(300, 400) = (308, 392)


def test_extreme_aspect_ratio_names_the_image_and_writes_nothing(tmp_path):
  path = tmp_path / "receipt_strip.png"
  Image.new("RGB", (402, 2)).save(path)
  out_dir = tmp_path / "processed"
  with pytest.raises(images.ImageError, match=r"receipt_strip\.png: aspect ratio 201\.0 \(402x2\) exceeds 200"):
    with io.atomic_dir(str(out_dir)) as tmp:  # a data job writing its output atomically
      np.save(os.path.join(tmp, "pixels.npy"), images.qwen_image_inputs([str(path)])["pixel_values"])
  assert not [n for n in os.listdir(tmp_path) if n.startswith("processed")]
  images.qwen_image_inputs([Image.new("RGB", (400, 2))])  # exactly 200 is accepted, as in transformers


def test_missing_and_corrupt_files_are_named(tmp_path):
  with pytest.raises(images.ImageError, match=r"nope\.png: image file not found"):
    images.qwen_image_inputs([str(tmp_path / "nope.png")])
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(images.ImageError, match=r"broken\.jpg: cannot read image"):
    images.qwen_image_inputs([str(bad)])
  with pytest.raises(images.ImageError, match=r"page-7: aspect ratio"):
    images.qwen_image_inputs([Image.new("RGB", (1, 300))], names=["page-7"])
