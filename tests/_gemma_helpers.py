"""Shared helpers for the Gemma 3 tests: tiny random HF models, key layouts, batches."""

from __future__ import annotations

import json
import os

import numpy as np

# A tiny multimodal Gemma 3: 7 text layers with the default pattern 6 (layer 5 global, the
# rest local), a sliding window of 5 (shorter than an image's 9 soft tokens and than every test
# sequence), linear rope scaling on global layers, odd widths everywhere.
TEXT = dict(vocab_size=331, hidden_size=45, intermediate_size=70, num_hidden_layers=7, num_attention_heads=3,
            num_key_value_heads=1, head_dim=10, sliding_window=5, query_pre_attn_scalar=13,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            max_position_embeddings=512)
VISION = dict(hidden_size=30, intermediate_size=46, num_hidden_layers=2, num_attention_heads=3, image_size=27,
              patch_size=3, vision_use_head=False)
MM = dict(mm_tokens_per_image=9, image_token_index=330, boi_token_index=328, eoi_token_index=329)
IMAGE_TOKEN, BOI, EOI = 330, 328, 329
TOKENS_PER_IMAGE = 9

# google/gemma-3-4b-it's config.json as published (transformers 4.50.0.dev0): the text and
# vision fields it names; everything else comes from transformers' config defaults.
GEMMA3_4B_IT_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def randomize(model, seed: int = 0, embed_std: float = 0.6):
  """Gives every parameter a random value (HF inits norms and the projector to zero).

  A small `embed_std` keeps the (tied) token embedding from dominating the residual stream,
  which otherwise makes greedy decoding repeat the last token.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        std = 0.3
      elif name.endswith("bias"):
        std = 0.1
      elif "embed_tokens" in name:
        std = embed_std
      elif "position_embedding" in name:
        std = 0.6
      elif p.ndim >= 2:
        fan_in = p.shape[0] if "mm_input_projection" in name else int(np.prod(p.shape[1:]))
        std = 1.3 / np.sqrt(fan_in)
      else:
        std = 0.3
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model


def tiny_vlm(seed: int = 0, text_overrides: dict | None = None, embed_std: float = 0.6):
  """A tiny random `Gemma3ForConditionalGeneration` (fp32, eager attention, eval mode)."""
  from transformers import Gemma3Config, Gemma3ForConditionalGeneration
  cfg = Gemma3Config(text_config=dict(TEXT, **(text_overrides or {})), vision_config=dict(VISION), **MM)
  cfg._attn_implementation = "eager"
  model = Gemma3ForConditionalGeneration(cfg)
  model.config._attn_implementation = "eager"
  return randomize(model, seed, embed_std).eval()


def tiny_causal_lm(seed: int = 0, embed_std: float = 0.6, **overrides):
  """A tiny random `Gemma3ForCausalLM`."""
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig
  cfg = Gemma3TextConfig(**dict(TEXT, **overrides))
  cfg._attn_implementation = "eager"
  return randomize(Gemma3ForCausalLM(cfg), seed, embed_std).eval()


# Canonical (transformers 5 in-memory) prefix -> the prefix each on-disk layout uses.
LAYOUTS = {
    "tf5": (),  # model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*
    "hub": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")),
    "tf4": (("model.vision_tower.", "model.vision_tower.vision_model."),),  # transformers 4.5x in memory
}


def save_in_layout(model, out_dir: str, layout: str, *, keep_tied_head: bool = False, extra: dict | None = None,
                   drop: tuple[str, ...] = ()):
  """Saves config.json and a single safetensors file whose keys follow `layout`.

  Layouts: "save_pretrained" (whatever transformers 5.24 writes: language_model.model.*,
  vision_tower.*), "tf5" (the in-memory state dict keys), "hub" (google/gemma-3-*-it's
  original files: language_model.model.*, vision_tower.vision_model.*,
  multi_modal_projector.*), "tf4" (model.vision_tower.vision_model.*).
  """
  from safetensors.torch import save_file
  model.save_pretrained(out_dir)
  if layout == "save_pretrained":
    return out_dir
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  if not keep_tied_head and model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  renamed = {}
  for key, value in state.items():
    for new, old in LAYOUTS[layout]:
      if key.startswith(new):
        key = old + key[len(new):]
        break
    if key not in drop:
      renamed[key] = value
  renamed.update(extra or {})
  for name in os.listdir(out_dir):
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      os.remove(os.path.join(out_dir, name))
  save_file(renamed, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return out_dir


def edit_config(hf_dir: str, fn):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  fn(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)


def image_run():
  return [BOI] + [IMAGE_TOKEN] * TOKENS_PER_IMAGE + [EOI]


def mm_rows(seed: int = 0, vocab: int = 300):
  """Token rows (unpadded): one image, two images, text only. Text ids avoid the special ids."""
  rng = np.random.RandomState(seed)
  def text(n):
    return list(rng.randint(3, vocab, n))
  return [
      text(4) + image_run() + text(9),
      text(2) + image_run() + text(3) + image_run() + text(6),
      text(21),
  ]


def pad_batch(rows, total: int, left: bool):
  """(input_ids, segment_ids, positions) int32 [B, total], padded left or right with id 0."""
  b = len(rows)
  ids = np.zeros((b, total), np.int32)
  seg = np.zeros((b, total), np.int32)
  for i, row in enumerate(rows):
    sl = slice(total - len(row), total) if left else slice(0, len(row))
    ids[i, sl] = row
    seg[i, sl] = 1
  # transformers' convention: positions count real tokens; pads get 0.
  pos = np.where(seg != 0, np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  return ids, seg, pos


def random_pixels(n: int, seed: int = 0, size: int = 27):
  return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def load_converted(ck_dir: str):
  from flax import nnx

  from jaxdpo.models import io
  _, cfg, graphdef, params = io.load_model(ck_dir)
  return cfg, nnx.merge(graphdef, params)


def rel_err(a, b, mask=None) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[mask], b[mask]
  return float(np.abs(a - b).max() / np.abs(b).max())
