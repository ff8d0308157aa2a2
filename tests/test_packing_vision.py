"""Packing with images (issue 16 acceptance 1, Qwen2.5-VL and Gemma 3): several pairs per row, each
row carrying its pairs' images (one pair slot each), give the two-row step's loss, metrics and
gradients (fp32; loss and metrics 1e-5 relative, gradients 1e-5 of each tensor's max).

Records hold 0, 1 and 2 images; rows hold 2 or more pairs, so a row splices several pairs' images
(each pair reading its own slot), Qwen2.5-VL's M-RoPE positions restart per pair from its
rope_deltas, and Gemma 3's bidirectional image groups and sliding windows (5 < every prompt) sit
inside a pair's segment. Same harness as `test_packing.py` (real train step, gradient recorder,
reference of another seed).
"""

from __future__ import annotations

import numpy as np
import pytest

import _vision_job_helpers as VH
from jaxdpo.data import pipeline, tokenize
from jaxdpo.jobs import common
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from tests import _layout_helpers as SL

PRESETS = {"qwen2_5_vl": "tiny_vl", "gemma3": "tiny"}
N_PAIRS = 6


@pytest.fixture(scope="module", params=sorted(PRESETS))
def data(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  c = config_defaults.base()
  c.model.family, c.model.preset = family, PRESETS[family]
  c.data.max_length, c.train.progress, c.train.batch_size = SL.MAX_LENGTH, False, N_PAIRS
  c.data.tokenizer = str(root / "tok")
  (VH.qwen_processor_files if family == "qwen2_5_vl" else VH.gemma_processor_files)(c.data.tokenizer)
  _, _, prefs = VH.vision_records(str(root / "data"), n=N_PAIRS, seed=0)
  tok = tokenize.load_tokenizer(c.data.tokenizer)
  vision = common.vision_adapter(c, tok)
  pairs = dpo_job.tokenize_preferences(prefs, tok, c, desc="t", vision=vision)
  vision = vision.with_budget(pairs)
  pad = tokenize.pad_token_id(tok)
  budget = 2 * max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)  # room for 2+ pairs a row
  return dict(config=c, pairs=pairs, bundles={},
              two=pipeline.collate_pairs(pairs, max_length=SL.MAX_LENGTH, pad_id=pad, vision=vision),
              packed=pipeline.collate_packed(pairs, max_length=SL.MAX_LENGTH, pad_id=pad, pack_tokens=budget,
                                             vision=vision))


def test_packed_rows_carry_their_pairs_images(data):
  packed, pairs = data["packed"], data["pairs"]
  assert int(packed["pair_valid"].sum()) == N_PAIRS and packed["pack_count"].max() >= 2
  assert sorted({len(p.images) for p in pairs}) == [0, 1, 2]
  per_slot = packed["pixel_values"]
  assert per_slot.shape[:2] == packed["pair_valid"].shape  # one image slot per pair slot
  # A row with 2+ pairs, at least two of them with images: its splice reads two pairs' slots.
  with_images = (per_slot.reshape(per_slot.shape[:2] + (-1,)) != 0).any(-1)
  assert (with_images.sum(1) >= 2).any()
  if data["config"].model.family == "qwen2_5_vl":
    assert packed["positions"].shape == (packed["input_ids"].shape[0], 3, packed["input_ids"].shape[1])
  else:
    assert min(len(p.prompt) for p in pairs) > 5  # Gemma's tiny window: windows cross into completions


def test_packed_step_with_images_equals_two_row_step(data):
  SL.assert_same(SL.step_grads(data, data["packed"]), SL.step_grads(data, data["two"]))


def test_negative_control_swapped_images(data):
  """Two pairs' image slots swapped within a row (each pair then reads another pair's features)
  moves the log-probs: the check sees which images a pair reads."""
  if data["config"].model.family != "gemma3":
    pytest.skip("one family suffices for the control (both splice through jaxdpo.models.splice)")
  packed = dict(data["packed"])
  with_images = (packed["pixel_values"].reshape(packed["pixel_values"].shape[:2] + (-1,)) != 0).any(-1)
  row = int(np.argmax(with_images.sum(1) >= 2))
  a, b = np.flatnonzero(with_images[row])[:2]
  for k in ("pixel_values", "image_grid_thw", "num_images"):
    if k in packed:
      v = packed[k].copy()
      v[row, [a, b]] = v[row, [b, a]]
      packed[k] = v
  m, _ = SL.step_grads(data, packed)
  m0, _ = SL.step_grads(data, data["two"])
  assert abs(m["logps/chosen"] - m0["logps/chosen"]) > 1e-4 * abs(m0["logps/chosen"])
