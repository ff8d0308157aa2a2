"""HF <-> jaxdpo mapping for the Qwen2 text decoder (and, later, the Qwen2.5-VL towers)."""

from __future__ import annotations

import re

from jaxdpo.models.convert_table import Rule, identity, linear_in, linear_out, reshape
from jaxdpo.models.qwen2_5_vl.config import Qwen2TextConfig


def text_config_from_hf(hf: dict) -> Qwen2TextConfig:
  """Builds the decoder config from a `Qwen2Config`-style dict (or a VL model's text_config)."""
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
  def normalize(key: str):
    if cfg.tie_word_embeddings and key == "lm_head.weight":
      return None  # tied: the embedding is the head; some exports still write a copy
    if key.endswith("rotary_emb.inv_freq"):
      return None  # a buffer, not a parameter
    return key
  return normalize
