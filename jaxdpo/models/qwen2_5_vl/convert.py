"""HF <-> jaxdpo mapping for the Qwen2 text decoder and for Qwen2.5-VL (vision tower + decoder)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxdpo.models import hf_fields
from jaxdpo.models.convert_table import (ConversionError, Rule, identity, key_normalizer, linear_in, linear_out,
                                         replace_prefix, reshape)
from jaxdpo.models.qwen2_5_vl.config import Qwen2_5_VLConfig, Qwen2TextConfig, VisionConfig


def text_config_from_hf(hf: dict, where: str = "config.json") -> Qwen2TextConfig:
  """Builds the decoder config from a `Qwen2Config`-style dict (or a VL model's text_config).

  Raises:
    ConversionError: a field changes the math in a way we do not implement (see `hf_fields`).
  """
  hf_fields.audit(hf, hf_fields.QWEN2_TEXT, where)
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = hf.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
  mrope = rope.get("mrope_section")
  return Qwen2TextConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
      intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim"), rope_theta=float(theta),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", True),
      hidden_act=hf.get("hidden_act", "silu"), mrope_section=tuple(mrope) if mrope else None,
      eos_token_id=_first(hf.get("eos_token_id")), pad_token_id=_first(hf.get("pad_token_id")))


def _first(x):
  return x[0] if isinstance(x, list) else x


def text_config_to_hf(cfg: Qwen2TextConfig) -> dict:
  """The `Qwen2ForCausalLM` config.json of a decoder config (inverse of `text_config_from_hf`).

  Used when a model was initialised from a preset and so carries no source config.json: its
  export must still load with `from_pretrained`.
  """
  if cfg.mrope_section is not None:
    raise ConversionError("a Qwen2 text config with mrope_section has no Qwen2ForCausalLM config.json "
                          "(M-RoPE is a Qwen2.5-VL feature)")
  hf = {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "intermediate_size": cfg.intermediate_size, "head_dim": cfg.head_size,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
      "hidden_act": cfg.hidden_act, "use_sliding_window": False, "attention_dropout": 0.0,
      "dtype": "float32",
  }
  # None ids are left out: transformers reads an absent id as None too.
  if cfg.eos_token_id is not None:
    hf["eos_token_id"] = cfg.eos_token_id
  if cfg.pad_token_id is not None:
    hf["pad_token_id"] = cfg.pad_token_id
  return hf


def text_rules(cfg: Qwen2TextConfig, hf_prefix: str = "model.", jax_prefix: str = "") -> list[Rule]:
  """Rules for the decoder; `hf_prefix` is where the decoder lives in the canonical HF layout."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  p, j = re.escape(hf_prefix), jax_prefix
  layer = p + r"layers\.(\d+)\."
  rules = [
      Rule(p + r"embed_tokens\.weight", j + "embed_tokens"),
      Rule(p + r"norm\.weight", j + "norm.weight"),
      Rule(layer + r"input_layernorm\.weight", j + "layers.{0}.input_layernorm.weight"),
      Rule(layer + r"post_attention_layernorm\.weight", j + "layers.{0}.post_attention_layernorm.weight"),
      Rule(layer + r"self_attn\.q_proj\.weight", j + "layers.{0}.self_attn.q.kernel", *linear_in(n, h)),
      Rule(layer + r"self_attn\.q_proj\.bias", j + "layers.{0}.self_attn.q.bias", *reshape(n, h)),
      Rule(layer + r"self_attn\.k_proj\.weight", j + "layers.{0}.self_attn.k.kernel", *linear_in(k, h)),
      Rule(layer + r"self_attn\.k_proj\.bias", j + "layers.{0}.self_attn.k.bias", *reshape(k, h)),
      Rule(layer + r"self_attn\.v_proj\.weight", j + "layers.{0}.self_attn.v.kernel", *linear_in(k, h)),
      Rule(layer + r"self_attn\.v_proj\.bias", j + "layers.{0}.self_attn.v.bias", *reshape(k, h)),
      Rule(layer + r"self_attn\.o_proj\.weight", j + "layers.{0}.self_attn.o.kernel", *linear_out(n, h)),
      Rule(layer + r"mlp\.gate_proj\.weight", j + "layers.{0}.mlp.gate.kernel", *linear_in(cfg.intermediate_size)),
      Rule(layer + r"mlp\.up_proj\.weight", j + "layers.{0}.mlp.up.kernel", *linear_in(cfg.intermediate_size)),
      Rule(layer + r"mlp\.down_proj\.weight", j + "layers.{0}.mlp.down.kernel", *linear_in(d)),
  ]
  if not cfg.tie_word_embeddings:
    rules.append(Rule(r"lm_head\.weight", j + "lm_head", identity, identity))
  return rules


def qwen2_normalize_key(cfg: Qwen2TextConfig):
  """Key normaliser for `Qwen2ForCausalLM` checkpoints: a tied lm_head copy is ignored."""
  return key_normalizer(tied=cfg.tie_word_embeddings)


# ----------------------------------------------------------------------------------------------
# Qwen2.5-VL (and Nanonets-OCR2-3B, the same architecture)
#
# Canonical HF layout (what `normalize_key` folds every layout into) is transformers-5's module
# tree: `model.language_model.*`, `model.visual.*`, `lm_head.*`. Accepted on input as well:
# the hub layout that Qwen's checkpoints use and that transformers still writes
# (`model.*` for the decoder, `visual.*`, `lm_head.*`), and the older `language_model.model.*` /
# `language_model.lm_head.*`. jax-to-hf writes the hub layout, which every transformers version
# and serving stack reads.

TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."

# (prefix on input, canonical prefix); first match wins, so the canonical prefixes come first.
_LAYOUTS = (
    (TEXT_PREFIX, TEXT_PREFIX),
    (VISION_PREFIX, VISION_PREFIX),
    ("language_model.model.", TEXT_PREFIX),
    ("language_model.lm_head.", "lm_head."),
    ("model.", TEXT_PREFIX),
    ("visual.", VISION_PREFIX),
)
_HUB_LAYOUT = ((TEXT_PREFIX, "model."), (VISION_PREFIX, "visual."))

# transformers' `Qwen2_5_VLVisionConfig` defaults, for fields a config.json leaves out.
_VISION_DEFAULTS = dict(depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                        fullatt_block_indexes=(7, 15, 23, 31), in_channels=3, hidden_act="silu",
                        tokens_per_second=4, rope_theta=10_000.0)


def vl_config_from_hf(hf: dict) -> Qwen2_5_VLConfig:
  """Builds the VL config from config.json: nested `text_config` (transformers >= 4.5x) or the flat
  legacy form with the text fields at the top level; `vision_config` is always nested."""
  hf_fields.audit({k: v for k, v in hf.items() if k in hf_fields.QWEN2_5_VL_TOP.known()},
                  hf_fields.QWEN2_5_VL_TOP, "config.json")
  nested = hf.get("text_config") or {}
  flat = {k: v for k, v in hf.items() if k not in hf_fields.QWEN2_5_VL_TOP.known()}  # legacy flat text fields
  text_src = {**flat, **nested}
  tie = bool(hf.get("tie_word_embeddings", False)) or bool(nested.get("tie_word_embeddings", False))
  rope = dict(text_src.get("rope_parameters") or text_src.get("rope_scaling") or {})
  rope.setdefault("mrope_section", [16, 24, 24])  # transformers' default when a config omits it
  text_src["rope_parameters"] = {**rope, "rope_theta": text_src.get("rope_theta", rope.get("rope_theta", 1e6))}
  text = dataclasses.replace(text_config_from_hf(text_src, "config.json text fields"), tie_word_embeddings=tie)
  vc = hf.get("vision_config") or {}
  hf_fields.audit(vc, hf_fields.QWEN2_5_VL_VISION, "config.json vision_config")
  vrope = vc.get("rope_parameters") or {}
  pick = lambda name, *aliases: next((vc[k] for k in (name, *aliases) if k in vc), _VISION_DEFAULTS[name])
  vision = VisionConfig(
      depth=pick("depth", "num_hidden_layers"), hidden_size=pick("hidden_size"),
      intermediate_size=pick("intermediate_size"), num_heads=pick("num_heads", "num_attention_heads"),
      out_hidden_size=pick("out_hidden_size"), patch_size=pick("patch_size", "spatial_patch_size"),
      temporal_patch_size=pick("temporal_patch_size"), spatial_merge_size=pick("spatial_merge_size"),
      window_size=pick("window_size"), fullatt_block_indexes=tuple(pick("fullatt_block_indexes")),
      in_channels=pick("in_channels", "in_chans"), hidden_act=pick("hidden_act"),
      tokens_per_second=pick("tokens_per_second"),
      rope_theta=float(vrope.get("rope_theta", vc.get("rope_theta", _VISION_DEFAULTS["rope_theta"]))))
  return Qwen2_5_VLConfig(
      text=text, vision=vision, image_token_id=hf.get("image_token_id", 151655),
      video_token_id=hf.get("video_token_id", 151656), vision_start_token_id=hf.get("vision_start_token_id", 151652),
      vision_end_token_id=hf.get("vision_end_token_id", 151653))


def vl_config_to_hf(cfg: Qwen2_5_VLConfig) -> dict:
  """The `Qwen2_5_VLForConditionalGeneration` config.json of a VL config (inverse of `vl_config_from_hf`).

  Written for models initialised from a preset (e.g. `demo_vl`), which carry no source config.json,
  so that their export loads with `from_pretrained`.

  Raises:
    ConversionError: the config uses a value transformers' Qwen2.5-VL cannot express (its text
      attention derives head_dim from hidden_size / heads; its vision norms use eps 1e-6).
  """
  t, v = cfg.text, cfg.vision
  if t.head_size * t.num_heads != t.hidden_size:
    raise ConversionError(f"text head_dim={t.head_size} x {t.num_heads} heads != hidden_size={t.hidden_size}: "
                          "transformers' Qwen2.5-VL attention cannot express it")
  if v.rms_norm_eps != 1e-6:
    raise ConversionError(f"vision rms_norm_eps={v.rms_norm_eps}: transformers' Qwen2.5-VL vision tower uses 1e-6")
  text = text_config_to_hf(dataclasses.replace(t, mrope_section=None))
  del text["architectures"]
  if t.head_dim is None:
    del text["head_dim"]  # as the source wrote it (a round trip gives the same config)
  # Token ids written even when None: transformers' Qwen2.5-VL defaults (151643 / 151645) lie
  # outside a small preset's vocabulary.
  text.update(model_type="qwen2_5_vl_text", bos_token_id=None, eos_token_id=t.eos_token_id,
              pad_token_id=t.pad_token_id,
              rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)})
  vision = {
      "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
      "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
      "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
      "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
      "fullatt_block_indexes": list(v.fullatt_block_indexes), "in_channels": v.in_channels,
      "hidden_act": v.hidden_act, "tokens_per_second": v.tokens_per_second,
      "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
  }
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "dtype": "float32",
      "text_config": text, "vision_config": vision, "tie_word_embeddings": t.tie_word_embeddings,
      "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
      "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
  }


def _patch_embed(cfg: VisionConfig):
  """Conv3d weight [D, C, t, p, p] <-> kernel [C*t*p*p, D] (the processor's patch flattening)."""
  shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
  def to_jax(w):
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
  def to_hf(k):
    return np.ascontiguousarray(k.T).reshape(shape)
  return to_jax, to_hf


def vision_rules(cfg: VisionConfig, hf_prefix: str = VISION_PREFIX, jax_prefix: str = "visual.") -> list[Rule]:
  """Rules for the vision tower."""
  n, h, d, mu = cfg.num_heads, cfg.head_size, cfg.hidden_size, cfg.merge_unit
  p, j = re.escape(hf_prefix), jax_prefix
  blk = p + r"blocks\.(\d+)\."
  jb = j + "blocks.{0}."
  return [
      Rule(p + r"patch_embed\.proj\.weight", j + "patch_embed.kernel", *_patch_embed(cfg)),
      Rule(blk + r"norm1\.weight", jb + "norm1.weight"),
      Rule(blk + r"norm2\.weight", jb + "norm2.weight"),
      Rule(blk + r"attn\.qkv\.weight", jb + "attn.qkv.kernel", *linear_in(3, n, h)),
      Rule(blk + r"attn\.qkv\.bias", jb + "attn.qkv.bias", *reshape(3, n, h)),
      Rule(blk + r"attn\.proj\.weight", jb + "attn.proj.kernel", *linear_out(n, h)),
      Rule(blk + r"attn\.proj\.bias", jb + "attn.proj.bias"),
      Rule(blk + r"mlp\.gate_proj\.weight", jb + "mlp.gate.kernel", *linear_in(cfg.intermediate_size)),
      Rule(blk + r"mlp\.gate_proj\.bias", jb + "mlp.gate.bias"),
      Rule(blk + r"mlp\.up_proj\.weight", jb + "mlp.up.kernel", *linear_in(cfg.intermediate_size)),
      Rule(blk + r"mlp\.up_proj\.bias", jb + "mlp.up.bias"),
      Rule(blk + r"mlp\.down_proj\.weight", jb + "mlp.down.kernel", *linear_in(d)),
      Rule(blk + r"mlp\.down_proj\.bias", jb + "mlp.down.bias"),
      Rule(p + r"merger\.ln_q\.weight", j + "merger.ln_q.weight"),
      Rule(p + r"merger\.mlp\.0\.weight", j + "merger.fc1.kernel", *linear_out(mu, d)),
      Rule(p + r"merger\.mlp\.0\.bias", j + "merger.fc1.bias"),
      Rule(p + r"merger\.mlp\.2\.weight", j + "merger.fc2.kernel", *linear_in(cfg.out_hidden_size)),
      Rule(p + r"merger\.mlp\.2\.bias", j + "merger.fc2.bias"),
  ]


def vl_rules(cfg: Qwen2_5_VLConfig) -> list[Rule]:
  return (text_rules(cfg.text, hf_prefix=TEXT_PREFIX, jax_prefix="language_model.")
          + vision_rules(cfg.vision))


def vl_normalize_key(cfg: Qwen2_5_VLConfig):
  """Folds every accepted key layout into the canonical (transformers-5) one."""
  return key_normalizer(_LAYOUTS, tied=cfg.text.tie_word_embeddings)


def vl_denormalize_key(key: str) -> str:
  """Canonical key -> the hub layout written by jax-to-hf."""
  return replace_prefix(key, _HUB_LAYOUT)
