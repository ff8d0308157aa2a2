"""Full-size Qwen2.5-VL-3B shapes: presets, config parsing and parameter count vs transformers."""

import dataclasses

import jax
import numpy as np
import torch

from jaxdpo.models import io, registry
from jaxdpo.models.qwen2_5_vl import config as qcfg
from jaxdpo.models.qwen2_5_vl import convert as qconv

# config.json of Qwen/Qwen2.5-VL-3B-Instruct (flat legacy form: text fields at the top level).
QWEN2_5_VL_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
TEXT_KEYS = ("hidden_act", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size", "rope_scaling", "eos_token_id")


def _nested(flat: dict) -> dict:
  """The same checkpoint as transformers >= 4.5x writes it (text fields under text_config)."""
  out = {k: v for k, v in flat.items() if k not in TEXT_KEYS}
  out["text_config"] = {k: flat[k] for k in TEXT_KEYS}
  return out


def _comparable(cfg):
  # head_dim is implied (hidden / heads) in config.json; pad id comes from generation_config.json.
  text = dataclasses.replace(cfg.text, head_dim=None, pad_token_id=None)
  return dataclasses.replace(cfg, text=text)


def test_presets_match_the_checkpoint_config():
  preset = qcfg.qwen2_5_vl_3b()
  assert preset.text.head_size == 128 and preset.vision.head_size == 80 and preset.vision.patch_dim == 1176
  for hf in (QWEN2_5_VL_3B_CONFIG, _nested(QWEN2_5_VL_3B_CONFIG)):
    parsed = qconv.vl_config_from_hf(hf)
    assert _comparable(parsed) == _comparable(preset)
  assert qcfg.nanonets_ocr2_3b() == preset
  assert registry.get_family("qwen2_5_vl").presets["nanonets_ocr2_3b"]() == preset


def test_parameter_count_equals_transformers():
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  hf_cfg = Qwen2_5_VLConfig.from_dict(QWEN2_5_VL_3B_CONFIG)
  with torch.device("meta"):  # shapes only, nothing allocated
    hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
  assert hf.lm_head.weight.is_meta and hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
  hf_count = sum(p.numel() for p in hf.parameters())  # a tied weight counts once
  hf_visual = sum(p.numel() for p in hf.model.visual.parameters())
  _, abstract = io.build_abstract(registry.get_family("qwen2_5_vl"), qcfg.qwen2_5_vl_3b())
  pure = abstract.to_pure_dict()
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pure))
  visual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pure["visual"]))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(pure))
  assert count == hf_count == 3_754_622_976
  assert visual == hf_visual


def test_full_size_forward_traces_abstractly():
  """The 3B model traces end to end on an OCR-sized page (no compute, no allocation)."""
  from flax import nnx
  cfg = qcfg.qwen2_5_vl_3b()
  family = registry.get_family("qwen2_5_vl")
  grid = np.array([[[1, 64, 80]]], np.int32)  # a 896 x 1120 page: 5120 patches, 1280 image tokens
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  inputs = {"input_ids": spec((2, 1400), np.int32), "segment_ids": spec((2, 1400), np.int32),
            "positions": spec((3, 2, 1400), np.int32), "pixel_values": spec((1, 5120, 1176), np.float32),
            "image_grid_thw": grid}

  def forward(inputs):
    model = family.build(cfg, nnx.Rngs(0), jax.numpy.bfloat16)
    return model.hidden_states(inputs), model.image_features(inputs["pixel_values"], inputs["image_grid_thw"])

  h, feats = jax.eval_shape(forward, inputs)
  assert h.shape == (2, 1400, 2048) and h.dtype == jax.numpy.bfloat16
  assert feats.shape == (1, 1280, 2048)
