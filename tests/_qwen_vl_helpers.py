"""Shared helpers for the Qwen2.5-VL tests: tiny random transformers models and a mixed batch."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from jaxdpo.data.vision.images import qwen_image_inputs, qwen_image_processor

# Special token ids of the tiny model (inside its small vocabulary).
VOCAB = 331
IMAGE, VIDEO, VSTART, VEND = 320, 321, 322, 323
PAD = 0
# Image sizes (width, height): with patch 4 and merge 2 these give grids (h, w) of (10, 12),
# (16, 8) and (6, 6) patches, i.e. 30, 32 and 9 image tokens; windows of 2 x 2 merged tokens
# are then partial, exact and partial.
IMAGE_SIZES = [(48, 40), (32, 64), (24, 24)]


def tiny_hf_config(tie: bool = True, depth: int = 4, fullatt=(1, 3), init_std: float = 0.02):
  """A tiny `Qwen2_5_VLConfig` with odd sizes, window attention active and two full blocks.

  A larger `init_std` makes greedy generation of the random model non-repetitive.
  """
  from transformers import Qwen2_5_VLConfig
  cfg = Qwen2_5_VLConfig(
      vision_config=dict(depth=depth, hidden_size=36, intermediate_size=52, num_heads=3, out_hidden_size=60,
                         patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                         fullatt_block_indexes=list(fullatt), tokens_per_second=2, in_channels=3),
      text_config=dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=92, num_hidden_layers=2,
                       num_attention_heads=5, num_key_value_heads=1, rms_norm_eps=1e-6, bos_token_id=1,
                       eos_token_id=2, pad_token_id=PAD, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0}),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
      tie_word_embeddings=tie, initializer_range=init_std)
  cfg.text_config.initializer_range = init_std
  cfg.vision_config.initializer_range = init_std
  return cfg


def build_hf_model(path: str, tie: bool = True, seed: int = 0, **kw):
  """Builds, perturbs (so norms and biases are not trivial) and saves a tiny HF model."""
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  cfg = tiny_hf_config(tie, **kw)
  cfg._attn_implementation = "eager"
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def tiny_processor():
  return qwen_image_processor(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=80 * 80)


def random_images(seed: int = 0):
  rng = np.random.RandomState(seed)
  return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES]


def mixed_batch(seed: int = 0, text_len=(5, 4, 3, 2, 3, 12)):
  """Three left-padded rows: one image; two images of different sizes; text only.

  Returns (input_ids [3, T], attention_mask [3, T], vision inputs dict of all three images).
  """
  rng = np.random.RandomState(seed)
  vision = qwen_image_inputs(random_images(seed), tiny_processor())
  n = vision["num_image_tokens"].tolist()
  text = lambda k: rng.randint(3, 300, k).tolist()
  img = lambda k: [VSTART] + [IMAGE] * k + [VEND]
  rows = [
      text(text_len[0]) + img(n[0]) + text(text_len[1]),
      text(text_len[2]) + img(n[1]) + text(text_len[3]) + img(n[2]) + text(text_len[4]),
      text(text_len[5]),
  ]
  t = max(len(r) for r in rows)
  ids = np.full((3, t), PAD, np.int64)
  mask = np.zeros((3, t), np.int64)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask, vision


def hf_inputs(ids, mask, vision):
  return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(vision["pixel_values"]), image_grid_thw=torch.tensor(vision["image_grid_thw"]),
              mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  from jaxdpo.models.convert_table import iter_hf_tensors
  return dict(iter_hf_tensors(hf_dir))


def write_layout(src_dir: str, dst_dir: str, rename):
  """Copies an HF directory, renaming every tensor key with `rename` (one shard)."""
  import shutil
  from safetensors.numpy import save_file
  os.makedirs(dst_dir)
  for name in os.listdir(src_dir):
    if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
      shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  tensors = {rename(k): v for k, v in read_safetensors(src_dir).items()}
  save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
  return tensors


def to_new_layout(key: str) -> str:
  """Hub layout (what transformers writes) -> transformers-5 module layout."""
  if key.startswith("visual."):
    return "model." + key
  if key.startswith("model."):
    return "model.language_model." + key[len("model."):]
  return key


def jitted(model, method):
  """`model.method(*args)` (a method name, or a function (model, *args)) as one jitted function of
  its arguments (eager nnx is slow on CPU)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, *args):
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(*args) if isinstance(method, str) else method(model, *args)
  return lambda *args: run(state, *args)


def full_logits(model, inputs):
  return model.logits(model.hidden_states(inputs))
