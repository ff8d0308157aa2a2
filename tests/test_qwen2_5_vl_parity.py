"""Qwen2.5-VL parity with transformers on a mixed batch (one image / two images / text only)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import _qwen_vl_helpers as H
from jaxdpo.models import io
from jaxdpo.models.qwen2_5_vl import inputs as qin
from jaxdpo.models.qwen2_5_vl import rope_index
from jaxdpo.models.qwen2_5_vl.vision import patch_layout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("qvl")
  hf = H.build_hf_model(str(d / "hf"))
  io.hf_to_jax_dir(str(d / "hf"), str(d / "ck"))  # the converter under test
  _, cfg, graphdef, params = io.load_model(str(d / "ck"))
  ids, mask, vision = H.mixed_batch()
  with torch.no_grad():
    ref = hf(**H.hf_inputs(ids, mask, vision))
    feats = hf.model.get_image_features(torch.tensor(vision["pixel_values"]),
                                        torch.tensor(vision["image_grid_thw"])).pooler_output
    pos, deltas = hf.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == H.IMAGE).astype(np.int64)),
                                          torch.tensor(vision["image_grid_thw"]), attention_mask=torch.tensor(mask))
  return dict(hf=hf, cfg=cfg, model=nnx.merge(graphdef, params), ids=ids, mask=mask, vision=vision,
              logits=ref.logits.numpy(), feats=torch.cat(feats).numpy(), pos=pos.numpy(), deltas=deltas.numpy())


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_batch_shape_is_as_intended(setup):
  grid = setup["vision"]["image_grid_thw"]
  assert grid.tolist() == [[1, 10, 12], [1, 16, 8], [1, 6, 6]]
  assert (setup["ids"] == H.IMAGE).sum(axis=1).tolist() == [30, 41, 0]
  assert setup["mask"].sum(axis=1).tolist()[2] < setup["ids"].shape[1]  # left padding present


def test_rope_index_matches_transformers(setup):
  cfg = setup["cfg"]
  pos, deltas = rope_index.get_rope_index(
      setup["ids"], setup["mask"], setup["vision"]["image_grid_thw"], spatial_merge_size=2,
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
  np.testing.assert_array_equal(pos, setup["pos"])
  np.testing.assert_array_equal(deltas, setup["deltas"])
  assert deltas[:, 0].tolist()[2] == 0 and min(deltas[:, 0].tolist()[:2]) < 0  # images compress positions


@pytest.mark.parametrize("num_patches,num_images", [(284, 3), (300, 5)])
def test_vision_tower_matches_transformers(setup, num_patches, num_images):
  v = setup["vision"]
  pixels, grid = qin.pad_vision(v["pixel_values"], v["image_grid_thw"], num_patches=num_patches,
                                num_images=num_images)
  out = np.asarray(H.jitted(setup["model"], "image_features")(pixels, grid))
  ref = setup["feats"]
  assert out.shape == (1, num_patches // 4, 60)
  assert _rel(out[0, :ref.shape[0]], ref) < 1e-5


def test_vision_tower_rows_match_transformers(setup):
  """Images packed into rows (image 0 | images 1 and 2 | empty) give the same tokens."""
  v = setup["vision"]
  pixels, grid = qin.pack_vision(v["pixel_values"], v["image_grid_thw"], rows=3, patches_per_row=168,
                                 images_per_row=2)
  assert grid[:, :, 1].tolist() == [[10, 0], [16, 6], [0, 0]]
  out = np.asarray(H.jitted(setup["model"], "image_features")(pixels, grid))
  assert out.shape == (3, 42, 60)
  ref = setup["feats"]
  assert _rel(np.concatenate([out[0, :30], out[1, :41]]), ref) < 1e-5


def test_window_attention_is_active(setup):
  """Running every block with full attention must not match: the windows matter."""
  cfg = setup["cfg"]
  layout = patch_layout(setup["vision"]["image_grid_thw"], 284, cfg.vision)
  windows = np.asarray(layout["window_ids"])
  assert len(np.unique(windows)) == 9 + 8 + 4  # 3x3, 4x2 and 2x2 windows of 2x2 merged tokens
  model = setup["model"]
  visual = model.visual
  visual.config = dataclasses.replace(cfg.vision, fullatt_block_indexes=tuple(range(cfg.vision.depth)))
  try:
    out = np.asarray(H.jitted(model, "image_features")(setup["vision"]["pixel_values"],
                                                       setup["vision"]["image_grid_thw"]))[0]
  finally:
    visual.config = cfg.vision
  assert _rel(out, setup["feats"]) > 1e-3


@pytest.mark.parametrize("rows", [None, 2])
def test_logits_match_transformers(setup, rows):
  cfg, v = setup["cfg"], setup["vision"]
  inputs = qin.make_inputs(cfg, setup["ids"], setup["mask"], v["pixel_values"], v["image_grid_thw"],
                           num_patches=292 if rows is None else 180, num_images=4 if rows is None else 2,
                           vision_rows=rows)
  logits = H.jitted(setup["model"], H.full_logits)
  out = np.asarray(logits({k: jnp.asarray(x) for k, x in inputs.items()}))
  real = setup["mask"].astype(bool)
  err = _rel(out[real], setup["logits"][real])
  assert err < 1e-5, err  # fp32 noise floor is ~2e-7 to 5e-7
  # The image rows really depend on the pixels: other pixels give other logits.
  inputs["pixel_values"] = inputs["pixel_values"] + 1.0
  moved = np.asarray(logits({k: jnp.asarray(x) for k, x in inputs.items()}))
  assert _rel(moved[:2][real[:2]], setup["logits"][:2][real[:2]]) > 1e-3
  assert _rel(moved[2][real[2]], out[2][real[2]]) < 1e-6  # the text-only row, relative to its max |logit|


def test_text_only_batch_needs_no_pixels(setup):
  cfg = setup["cfg"]
  ids, mask = setup["ids"][2:], setup["mask"][2:]
  inputs = qin.make_inputs(cfg, ids, mask)
  assert "pixel_values" not in inputs
  out = np.asarray(H.jitted(setup["model"], H.full_logits)(inputs))
  real = mask.astype(bool)
  assert _rel(out[real], setup["logits"][2:][real]) < 1e-5


def test_mismatched_image_tokens_are_rejected(setup):
  cfg, v = setup["cfg"], setup["vision"]
  ids = setup["ids"].copy()
  first = np.argmax(ids[0] == H.IMAGE)
  ids[0, first] = 5  # one placeholder fewer than the grid needs
  with pytest.raises(ValueError, match=r"row 0: 29 consecutive image placeholder tokens, but grid \(1, 10, 12\) "
                                       r"needs 30"):
    qin.make_inputs(cfg, ids, setup["mask"], v["pixel_values"], v["image_grid_thw"])
  with pytest.raises(ValueError, match="1 image grid"):
    qin.make_inputs(cfg, setup["ids"][:1], setup["mask"][:1], v["pixel_values"][:120 + 128],
                    v["image_grid_thw"][:2])



def test_rows_sharing_images_match_transformers(setup):
  """A DPO-style batch (row 0 twice, as chosen and rejected) reads row 0's image once."""
  cfg, v, hf = setup["cfg"], setup["vision"], setup["hf"]
  ids, mask = setup["ids"][[0, 0, 1, 2]].copy(), setup["mask"][[0, 0, 1, 2]]
  ids[1, -2:] = [7, 8]  # a different "completion" after the same prompt
  grid = v["image_grid_thw"]
  per_image = np.split(v["pixel_values"], np.cumsum(grid.prod(axis=1))[:-1])
  with torch.no_grad():  # transformers needs the shared image twice
    twice = dict(pixel_values=np.concatenate([per_image[0], per_image[0], per_image[1], per_image[2]]),
                 image_grid_thw=grid[[0, 0, 1, 2]])
    ref = hf(**H.hf_inputs(ids, mask, twice)).logits.numpy()
  inputs = qin.make_inputs(cfg, ids, mask, v["pixel_values"], grid, num_patches=168, num_images=2,
                           vision_row=[0, 0, 1, 2])
  assert inputs["pixel_values"].shape == (3, 168, 96)  # each image set once; row 2 is empty
  out = np.asarray(H.jitted(setup["model"], H.full_logits)({k: jnp.asarray(x) for k, x in inputs.items()}))
  real = mask.astype(bool)
  assert _rel(out[real], ref[real]) < 1e-5
  with pytest.raises(ValueError, match="text rows sharing vision row 0 hold different numbers of images"):
    qin.make_inputs(cfg, ids, mask, v["pixel_values"], grid, num_patches=168, num_images=2, vision_row=[0, 0, 0, 1])
