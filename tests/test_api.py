"""The public API against transformers, using nothing of jaxdpo but `jaxdpo.api`.

A tiny random `Qwen2ForCausalLM` is saved with `save_pretrained`, converted and loaded through the
API; its logits, greedy continuations and DPO pair log-probs must match transformers'.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxdpo import api

WORDS = ["<pad>", "<unk>", "<eos>"] + ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
                                       "mike november oscar papa quebec romeo sierra tango").split()
VOCAB = 96  # the model's rows; ids past the words are never produced by the tokenizer, only generated


def _max_rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("api")
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                 num_key_value_heads=1, intermediate_size=72, head_dim=8, rope_theta=10000.0,
                                 tie_word_embeddings=False, max_position_embeddings=128, eos_token_id=2,
                                 pad_token_id=0, attn_implementation="eager")
  hf = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norms, so that a wrong norm convention cannot pass
    for name, p in hf.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                             eos_token="<eos>")
  hf_dir = os.path.join(root, "hf")
  hf.save_pretrained(hf_dir)
  tok.save_pretrained(hf_dir)
  ckpt = api.convert(hf_dir, os.path.join(root, "ckpt"))
  return hf, tok, ckpt


PROMPTS = ["alpha bravo charlie delta echo", "golf hotel", "kilo lima mike november oscar papa quebec"]


def _hf_logits(hf, ids, seg, pos):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(ids, np.int64)), attention_mask=torch.tensor(np.asarray(seg, np.int64)),
              position_ids=torch.tensor(np.asarray(pos, np.int64))).logits.numpy()


def test_load_and_logits_match_transformers(converted):
  hf, tok, ckpt = converted
  family, config, model = api.load(ckpt)
  assert family == "qwen2" and family in api.families()
  assert config.vocab_size == VOCAB and not config.tie_word_embeddings
  inputs = api.model_inputs(family, tok, PROMPTS)
  seg = inputs["segment_ids"]
  assert inputs["input_ids"].shape == (3, 7) and seg[1].tolist() == [0] * 5 + [1] * 2  # left-padded
  ours = np.asarray(api.logits(model, inputs))
  theirs = _hf_logits(hf, inputs["input_ids"], seg, inputs["positions"])
  real = seg.astype(bool)
  assert ours.shape == theirs.shape == (3, 7, VOCAB)
  assert _max_rel_err(ours[real], theirs[real]) <= 1e-5
  # Negative control: the same comparison notices a one-token change of the input.
  shifted = dict(inputs, input_ids=np.where(real, (inputs["input_ids"] + 1) % len(WORDS), 0))
  assert _max_rel_err(np.asarray(api.logits(model, shifted))[real], theirs[real]) > 1e-2


def test_greedy_generation_matches_transformers(converted):
  hf, tok, ckpt = converted
  family, _, model = api.load(ckpt)
  inputs = api.model_inputs(family, tok, PROMPTS)
  n = 8
  out = api.generate(model, inputs, max_new_tokens=n)
  ours = np.asarray(out.tokens)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(inputs["input_ids"], dtype=torch.long),
                      attention_mask=torch.tensor(inputs["segment_ids"], dtype=torch.long), max_new_tokens=n,
                      do_sample=False, eos_token_id=2, pad_token_id=0).numpy()[:, inputs["input_ids"].shape[1]:]
  # transformers stops when every row has ended; rows that ended emit the pad id in both.
  assert ref.shape[1] <= n
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == 0).all()
  assert (ours != 0).any()


def test_pair_logps_match_transformers(converted):
  hf, tok, ckpt = converted
  _, _, model = api.load(ckpt)
  pairs = [{"prompt": "alpha bravo", "chosen": "charlie delta echo", "rejected": "foxtrot"},
           {"prompt": "golf hotel india", "chosen": "juliet", "rejected": "kilo lima mike november"}]
  batch = api.preference_batch(tok, pairs, max_length=12)
  chosen, rejected = api.pair_logps(model, batch)
  expected = np.zeros((2, 2))
  for j in range(2):
    ids, seg, pos, mask = (batch[k][:, j] for k in ("input_ids", "segment_ids", "positions", "loss_mask"))
    logp = torch.log_softmax(torch.tensor(_hf_logits(hf, ids, seg, pos), dtype=torch.float64), -1).numpy()
    token_logp = np.take_along_axis(logp[:, :-1], ids[:, 1:, None].astype(np.int64), -1)[..., 0]
    expected[:, j] = (token_logp * mask[:, 1:]).sum(axis=1)
  # Completions: 3 and 1 words plus EOS (chosen), 1 and 4 words plus EOS (rejected).
  assert batch["loss_mask"].sum(axis=-1).tolist() == [[4, 2], [2, 5]]
  ours = np.stack([np.asarray(chosen), np.asarray(rejected)], axis=1)
  assert _max_rel_err(ours, expected) <= 1e-5


@pytest.fixture(scope="module")
def converted_vl(tmp_path_factory, converted):
  """A tiny random `Qwen2_5_VLForConditionalGeneration` (tied head) with the same tokenizer."""
  _, tok, _ = converted
  root = tmp_path_factory.mktemp("api_vl")
  torch.manual_seed(1)
  cfg = transformers.Qwen2_5_VLConfig(
      vision_config=dict(depth=2, hidden_size=36, intermediate_size=52, num_heads=3, out_hidden_size=60,
                         patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                         fullatt_block_indexes=[1], tokens_per_second=2, in_channels=3),
      text_config=dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=92, num_hidden_layers=2,
                       num_attention_heads=5, num_key_value_heads=1, rms_norm_eps=1e-6, eos_token_id=2,
                       pad_token_id=0, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0}),
      image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93,
      tie_word_embeddings=True)
  cfg._attn_implementation = "eager"
  hf = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  hf_dir = os.path.join(root, "hf")
  hf.save_pretrained(hf_dir)
  tok.save_pretrained(hf_dir)
  # The text tokenizer has no image tokens and there is no processor: weights only (tests use `tok`).
  return hf, tok, api.convert(hf_dir, os.path.join(root, "ckpt"), tokenizer=False)


def test_qwen2_5_vl_text_logits_and_greedy_generation(converted_vl):
  """The vision-language family through the same calls (text prompts: M-RoPE streams coincide)."""
  hf, tok, ckpt = converted_vl
  family, config, model = api.load(ckpt)
  assert family == "qwen2_5_vl" and config.text.tie_word_embeddings
  inputs = api.model_inputs(family, tok, PROMPTS)
  ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
  mask = torch.tensor(inputs["segment_ids"], dtype=torch.long)
  with torch.no_grad():
    theirs = hf(input_ids=ids, attention_mask=mask).logits.numpy()
  real = inputs["segment_ids"].astype(bool)
  assert _max_rel_err(np.asarray(api.logits(model, inputs))[real], theirs[real]) <= 1e-5
  n = 6
  ours = np.asarray(api.generate(model, inputs, max_new_tokens=n).tokens)
  with torch.no_grad():
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=2,
                      pad_token_id=0).numpy()[:, ids.shape[1]:]
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == 0).all()
