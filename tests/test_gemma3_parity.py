"""Gemma 3 logits parity against transformers (eager attention, fp32).

The multimodal batch has three rows (one image, two images, text only) longer than the sliding
window (5), which is itself shorter than an image's 9 soft tokens, so the window also cuts
into the bidirectional image blocks; both layer kinds are present (7 layers, pattern 6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

import _gemma_helpers as H
from jaxdpo.models import io

T = 36


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory):
  hf = H.tiny_vlm(seed=0)
  d = tmp_path_factory.mktemp("g3vlm")
  H.save_in_layout(hf, str(d / "hf"), "save_pretrained")
  io.hf_to_jax_dir(str(d / "hf"), str(d / "ck"))
  _, model = H.load_converted(str(d / "ck"))
  return hf, model


@nnx.jit
def _logits(model, inputs):
  return model.logits(model.hidden_states(inputs))


def _hf_logits(hf, ids, seg, pos, pixels):
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels),
             attention_mask=torch.tensor(seg), position_ids=torch.tensor(pos, dtype=torch.long),
             token_type_ids=torch.tensor((ids == H.IMAGE_TOKEN).astype(np.int64)))
  return out.logits.numpy()


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_multimodal_logits_match_transformers(vlm_pair, left):
  hf, model = vlm_pair
  ids, seg, pos = H.pad_batch(H.mm_rows(seed=1), T, left=left)
  assert ids.shape == (3, T) and (ids == H.IMAGE_TOKEN).sum(axis=1).tolist() == [9, 18, 0]
  pixels = H.random_pixels(3, seed=2)
  ref = _hf_logits(hf, ids, seg, pos, pixels)
  out = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=pixels)))
  err = H.rel_err(out, ref, seg != 0)
  print(f"multimodal rel err ({'left' if left else 'right'} pad): {err:.2e}")
  assert err < 1e-5


def test_padded_image_slots_and_image_embeds(vlm_pair):
  """A fixed image count with an unused padding image, or precomputed soft tokens, changes nothing."""
  _, model = vlm_pair
  ids, seg, pos = H.pad_batch(H.mm_rows(seed=1), T, left=False)
  pixels = H.random_pixels(3, seed=2)
  base = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=pixels)))
  padded = np.concatenate([pixels, np.zeros_like(pixels[:2])])
  out = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=padded)))
  assert H.rel_err(out, base) <= 1e-5  # relative to max|logit|; a bare atol ignores the logits' scale
  embeds = nnx.jit(lambda m, p: m.encode_images(p))(model, pixels)
  assert embeds.shape == (3, 9, 45)
  out = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos, image_embeds=embeds)))
  assert H.rel_err(out, base) <= 1e-5


def test_image_index_shares_images_between_rows(vlm_pair):
  """DPO layout: rows (c0, r0, c1, r1) repeat their prompt's images; `image_index` lets each
  distinct image be encoded once and gives the same logits as passing every copy."""
  _, model = vlm_pair
  prompts = H.mm_rows(seed=1)[:2]
  rng = np.random.RandomState(6)
  rows = [p + list(rng.randint(3, 300, n)) for p in prompts for n in (2, 3)]  # c0, r0, c1, r1
  ids, seg, pos = H.pad_batch(rows, T, left=False)
  pixels = H.random_pixels(3, seed=2)  # prompt 0 has image 0; prompt 1 has images 1 and 2
  copies = pixels[[0, 0, 1, 2, 1, 2]]
  base = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=copies)))
  shared = dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=pixels,
                image_index=np.array([0, 0, 1, 2, 1, 2, 0, 0], np.int32))  # padded to 8 runs
  # Relative to max|logit|: a bare atol of 1e-5 failed on 8 of 47664 fp32 logits (max abs difference
  # 1.14e-5), since the vision tower encodes a different batch of images and the sums round differently.
  assert H.rel_err(np.asarray(_logits(model, shared)), base) <= 1e-5
  wrong = dict(shared, image_index=np.array([0, 0, 2, 1, 1, 2, 0, 0], np.int32))
  assert np.abs(np.asarray(_logits(model, wrong)) - base).max() > 1e-3


def test_negative_controls_fail(vlm_pair):
  """The parity test can fail: dropping the bidirectional image mask or the images is visible."""
  hf, model = vlm_pair
  ids, seg, pos = H.pad_batch(H.mm_rows(seed=1), T, left=False)
  pixels = H.random_pixels(3, seed=2)
  ref = _hf_logits(hf, ids, seg, pos, pixels)
  @nnx.jit
  def causal_only(model, inputs):
    x, _ = model.embed_inputs(inputs)
    h, _ = model.language_model(inputs_embeds=x, positions=inputs["positions"], segment_ids=inputs["segment_ids"])
    return model.logits(h)
  out = causal_only(model, dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=pixels))
  assert H.rel_err(np.asarray(out), ref, seg != 0) > 1e-3
  other = H.random_pixels(3, seed=3)
  out = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=other)))
  assert H.rel_err(out[:2], ref[:2], seg[:2] != 0) > 1e-3
  # The text-only row does not depend on the images of other rows.
  np.testing.assert_allclose(out[2][seg[2] != 0], ref[2][seg[2] != 0], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_causal_lm_logits_match_transformers(tmp_path):
  """Gemma3ForCausalLM: final logit softcapping applied, attention softcapping ignored (as
  transformers 5.24 does), attention biases, right padding."""
  hf = H.tiny_causal_lm(seed=4, final_logit_softcapping=3.0, attn_logit_softcapping=2.0, attention_bias=True)
  H.save_in_layout(hf, str(tmp_path / "hf"), "save_pretrained")
  io.hf_to_jax_dir(str(tmp_path / "hf"), str(tmp_path / "ck"))
  cfg, model = H.load_converted(str(tmp_path / "ck"))
  assert cfg.final_logit_softcapping == 3.0 and cfg.attention_bias
  rows = [list(np.random.RandomState(5).randint(0, 331, n)) for n in (23, 17)]
  ids, seg, pos = H.pad_batch(rows, 23, left=False)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg),
             position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
  assert np.abs(ref).max() <= 3.0  # the softcap is active
  out = np.asarray(_logits(model, dict(input_ids=ids, segment_ids=seg, positions=pos)))
  err = H.rel_err(out, ref, seg != 0)
  print(f"causal LM rel err: {err:.2e}")
  assert err < 1e-5


def test_window_matters_for_parity(vlm_pair):
  """Local layers really are windowed: widening the window changes the logits."""
  _, model = vlm_pair
  ids, seg, pos = H.pad_batch(H.mm_rows(seed=1), T, left=False)
  inputs = dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=H.random_pixels(3, seed=2))
  base = np.asarray(_logits(model, inputs))

  @nnx.jit
  def unwindowed(model, inputs):
    x, groups = model.embed_inputs(inputs)
    lm, seg = model.language_model, inputs["segment_ids"]
    masks = dict(lm.masks(seg, seg, groups_q=groups, groups_kv=groups))
    masks["sliding_attention"] = masks["full_attention"]
    h, _ = lm(inputs_embeds=x, positions=inputs["positions"], segment_ids=seg, masks=masks)
    return model.logits(h)
  assert H.rel_err(np.asarray(unwindowed(model, inputs)), base, seg != 0) > 1e-3
  assert np.isfinite(base).all()
