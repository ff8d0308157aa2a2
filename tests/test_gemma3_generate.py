"""Gemma 3 generation protocol: greedy decoding with images equals transformers' `generate`.

Three left-padded prompts of different lengths (one image, two images, text only); prompt plus
new tokens run far past the sliding window (5), so local layers drop old keys while decoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

import _gemma_helpers as H
from jaxdpo.models import io

NEW = 12


@nnx.jit
def _prefill(model, inputs, cache):
  return model.prefill(inputs, cache)


@nnx.jit
def _decode(model, tokens, cache):
  return model.decode(tokens, cache)


def greedy(model, inputs, max_len):
  """Prefill + decode loop; returns (tokens [B, NEW], logits [NEW, B, V])."""
  cache = model.init_cache(inputs["input_ids"].shape[0], max_len)
  logits, cache = _prefill(model, inputs, cache)
  toks, all_logits = [], []
  for _ in range(NEW):
    all_logits.append(np.asarray(logits))
    tok = np.asarray(logits).argmax(-1).astype(np.int32)
    toks.append(tok)
    logits, cache = _decode(model, tok, cache)
  return np.stack(toks, axis=1), np.stack(all_logits)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  hf = H.tiny_vlm(seed=7, embed_std=0.05)  # small embeddings: varied greedy output
  hf.generation_config.eos_token_id = None  # run every row to NEW tokens
  d = tmp_path_factory.mktemp("g3gen")
  H.save_in_layout(hf, str(d / "hf"), "save_pretrained")
  io.hf_to_jax_dir(str(d / "hf"), str(d / "ck"))
  return hf, H.load_converted(str(d / "ck"))[1]


def test_greedy_generation_with_images_matches_transformers(pair):
  hf, model = pair
  rows = H.mm_rows(seed=8)
  t = max(map(len, rows))
  ids, seg, _ = H.pad_batch(rows, t, left=True)
  assert sorted(seg.sum(1).tolist()) == [21, 24, 33]
  assert t + NEW > 8 * model.config.text.sliding_window
  pixels = H.random_pixels(3, seed=9)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg),
                      pixel_values=torch.tensor(pixels),
                      token_type_ids=torch.tensor((ids == H.IMAGE_TOKEN).astype(np.int64)),
                      do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                      return_dict_in_generate=True, output_logits=True)
  ref_tokens = out.sequences[:, t:].numpy()
  ref_logits = torch.stack(out.logits).numpy()  # [NEW, B, V]
  tokens, logits = greedy(model, dict(input_ids=ids, segment_ids=seg, pixel_values=pixels), t + NEW)
  err = H.rel_err(logits, ref_logits)
  print(f"generation: tokens equal={np.array_equal(tokens, ref_tokens)}, step-logit rel err {err:.2e}")
  np.testing.assert_array_equal(tokens, ref_tokens)
  assert err < 1e-4
  # Varied continuations (a model that repeats one token would hide cache bugs).
  assert all(len(set(r)) >= 4 for r in tokens.tolist()), tokens


def test_cached_decoding_equals_full_forward(pair):
  """Logits from prefill + decode equal a single full forward over the generated sequence."""
  _, model = pair
  rows = H.mm_rows(seed=8)
  t = max(map(len, rows))
  ids, seg, _ = H.pad_batch(rows, t, left=True)
  pixels = H.random_pixels(3, seed=9)
  tokens, logits = greedy(model, dict(input_ids=ids, segment_ids=seg, pixel_values=pixels), t + NEW)
  full_ids = np.concatenate([ids, tokens], axis=1)
  full_seg = np.concatenate([seg, np.ones_like(tokens)], axis=1)
  pos = np.where(full_seg != 0, np.cumsum(full_seg, axis=1) - 1, 0).astype(np.int32)
  h = nnx.jit(lambda m, x: m.logits(m.hidden_states(x)))(
      model, dict(input_ids=full_ids, segment_ids=full_seg, positions=pos, pixel_values=pixels))
  full = np.asarray(h)[:, t - 1:t - 1 + NEW].transpose(1, 0, 2)
  assert H.rel_err(logits, full) < 1e-5


@pytest.mark.parametrize("window", [5, 64], ids=["window_5", "window_beyond_max_len"])
def test_causal_lm_greedy_matches_transformers(tmp_path, window):
  """Text-only checkpoints: same protocol, final softcap applied, ring buffer of min(W, max_len)."""
  hf = H.tiny_causal_lm(seed=11, embed_std=0.05, sliding_window=window, final_logit_softcapping=5.0)
  hf.generation_config.eos_token_id = None
  H.save_in_layout(hf, str(tmp_path / "hf"), "save_pretrained")
  io.hf_to_jax_dir(str(tmp_path / "hf"), str(tmp_path / "ck"))
  model = H.load_converted(str(tmp_path / "ck"))[1]
  rng = np.random.RandomState(12)
  rows = [list(rng.randint(3, 331, n)) for n in (6, 19, 13)]
  ids, seg, _ = H.pad_batch(rows, 19, left=True)
  cache = model.init_cache(3, 19 + NEW)
  ring = min(window, 19 + NEW)
  assert [kv[0].shape[1] for kv in cache["kv"]] == [ring] * 5 + [19 + NEW] + [ring]
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg),
                      do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                      return_dict_in_generate=True, output_logits=True)
  tokens, logits = greedy(model, dict(input_ids=ids, segment_ids=seg), 19 + NEW)
  np.testing.assert_array_equal(tokens, out.sequences[:, 19:].numpy())
  assert H.rel_err(logits, torch.stack(out.logits).numpy()) < 1e-4
  assert len(set(tokens.ravel().tolist())) >= 8, tokens
