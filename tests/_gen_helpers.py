"""Shared helpers for the generation tests: a tiny random HF Qwen2 and its jaxdpo twin."""

from __future__ import annotations

import os

import numpy as np

VOCAB = 97


def tiny_qwen2_pair(tmp_dir: str, seed: int = 0):
  """Builds a tiny random `Qwen2ForCausalLM`, converts it, and returns (hf_model, nnx_model).

  Weights use a large init std so that logits are peaked: greedy parity against torch then
  does not hinge on float rounding between near-tied tokens.
  """
  import torch
  from flax import nnx
  from transformers import Qwen2Config, Qwen2ForCausalLM

  from jaxdpo.models import io

  torch.manual_seed(seed)
  hf_cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                       num_key_value_heads=1, intermediate_size=72, head_dim=8, tie_word_embeddings=False,
                       rope_theta=10_000.0, initializer_range=0.2, max_position_embeddings=256)
  hf = Qwen2ForCausalLM(hf_cfg).eval()
  hf_dir, ck_dir = os.path.join(tmp_dir, "hf"), os.path.join(tmp_dir, "ck")
  hf.save_pretrained(hf_dir)
  io.hf_to_jax_dir(hf_dir, ck_dir)
  _, _, graphdef, params = io.load_model(ck_dir)
  return hf, nnx.merge(graphdef, params)


def left_padded_batch(lengths, total: int, seed: int = 0, pad_id: int = 0):
  """Random prompts of the given lengths, left-padded to `total`: (input_ids, segment_ids)."""
  rng = np.random.RandomState(seed)
  ids = np.full((len(lengths), total), pad_id, np.int32)
  seg = np.zeros((len(lengths), total), np.int32)
  for i, n in enumerate(lengths):
    ids[i, total - n:] = rng.randint(1, VOCAB, n)
    seg[i, total - n:] = 1
  return ids, seg


def hf_greedy(hf, ids, seg, *, max_new_tokens: int, eos_token_id, pad_token_id: int) -> np.ndarray:
  """transformers' greedy `generate`, new tokens only, right-filled with pad to max_new_tokens."""
  import torch
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg),
                      do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                      eos_token_id=eos_token_id, min_new_tokens=0)
  new = out[:, ids.shape[1]:].numpy()
  full = np.full((ids.shape[0], max_new_tokens), pad_token_id, np.int64)
  full[:, :new.shape[1]] = new
  return full
