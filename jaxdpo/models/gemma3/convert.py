"""HF <-> jaxdpo mapping for Gemma 3 (`Gemma3ForConditionalGeneration`, `Gemma3ForCausalLM`).

Config parsing mirrors transformers 5.24's `Gemma3TextConfig` / `Gemma3Config` defaults, for
both config formats: transformers 5 (`layer_types`, `rope_parameters` per layer type) and the
legacy one (`sliding_window_pattern`, `rope_theta`, `rope_local_base_freq`, `rope_scaling`).

Key layouts. The canonical (and written) layout is transformers 5's in-memory one:
  model.language_model.*, model.vision_tower.{embeddings,encoder,post_layernorm}.*,
  model.multi_modal_projector.*, lm_head.weight (Gemma3ForCausalLM: model.*, lm_head.weight).
Also read: language_model.model.* / language_model.lm_head.* (legacy, and what
`save_pretrained` still writes), vision_tower.vision_model.* (the original Hub files),
vision_tower.* (5.x `save_pretrained`), model.vision_tower.vision_model.* (4.5x) and
multi_modal_projector.*.

Vocabulary. Gemma 3 multimodal checkpoints have 262208 embedding rows (262144 tokenizer
entries, the image token 262144 and padding); some exports carry 262144. A checkpoint whose
embedding rows disagree with config.json's `vocab_size` is refused with an explanation rather
than truncated or padded: the ids above 262144 (image soft token) would otherwise be misread.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from jaxdpo.models import hf_fields
from jaxdpo.models.convert_table import (ROTARY_BUFFER, ConversionError, Rule, identity, key_normalizer, linear_in,
                                         linear_out, reshape)
from jaxdpo.models.gemma3.config import (FULL, SLIDING, Gemma3Config, Gemma3TextConfig, SiglipVisionConfig,
                                         layer_types_from_pattern)

log = logging.getLogger(__name__)

# transformers 5.24 `Gemma3TextConfig` defaults (the Hub configs rely on them).
_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                      query_pre_attn_scalar=256, sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_bias=False,
                      tie_word_embeddings=True)
_GLOBAL_THETA, _LOCAL_THETA = 1_000_000.0, 10_000.0
# transformers 5.24 `SiglipVisionConfig` defaults.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6, vision_use_head=True)


def _get(d: dict, key: str, defaults: dict):
  v = d.get(key)
  return defaults[key] if v is None else v


def _ids(x) -> tuple[int, ...]:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _rope(t: dict) -> dict[str, tuple[float, float]]:
  """{layer kind: (theta, linear factor)}, resolved as `Gemma3TextConfig` resolves it."""
  params = t.get("rope_parameters")
  if params is None:
    params = {}
  elif not (FULL in params or SLIDING in params):
    raise ConversionError(f"rope_parameters {params} is not keyed by layer type ({FULL!r}, {SLIDING!r}); "
                          "Gemma 3 needs one entry per layer type")
  full = dict(params.get(FULL) or {"rope_type": "default"})
  local = dict(params.get(SLIDING) or {"rope_type": "default"})
  if t.get("rope_scaling"):
    full.update(t["rope_scaling"])  # legacy: the scaling applies to global layers only
  full.setdefault("rope_theta", t.get("rope_theta") or _GLOBAL_THETA)
  local.setdefault("rope_theta", t.get("rope_local_base_freq") or _LOCAL_THETA)
  out = {}
  for kind, p in ((FULL, full), (SLIDING, local)):
    rope_type = p.get("rope_type", p.get("type", "default"))
    if "type" in p and p["type"] != rope_type:
      # transformers 5.24 keeps rope_type="default" here and silently drops the scaling.
      raise ConversionError(f"{kind} rope parameters {p} give 'type'={p['type']!r} but "
                            f"'rope_type'={rope_type!r}; transformers would ignore the scaling. "
                            "Write 'rope_type' explicitly in config.json")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConversionError(f"{kind}: partial_rotary_factor is not supported for Gemma 3")
    if rope_type == "default":
      factor = 1.0
    elif rope_type == "linear":
      factor = float(p["factor"])
    else:
      raise ConversionError(f"{kind}: rope_type {rope_type!r} is not supported (Gemma 3 uses 'default' and "
                            "'linear')")
    out[kind] = (float(p["rope_theta"]), factor)
  return out


def text_config_from_hf(t: dict, *, causal_lm: bool, tie_word_embeddings: bool | None = None,
                        eos_token_id=None) -> Gemma3TextConfig:
  """Builds the decoder config from a `Gemma3TextConfig`-style dict.

  Args:
    t: the text config dict (config.json itself for `Gemma3ForCausalLM`, `text_config` for
      the multimodal model); missing keys take transformers' defaults.
    causal_lm: whether the head is `Gemma3ForCausalLM`'s, which applies
      `final_logit_softcapping`; `Gemma3ForConditionalGeneration` never does.
    tie_word_embeddings, eos_token_id: overrides from the multimodal top-level config.
  """
  hf_fields.audit(t, hf_fields.GEMMA3_TEXT, "config.json" if causal_lm else "config.json text_config")
  if t.get("use_bidirectional_attention"):
    raise ConversionError("use_bidirectional_attention=True (embedding models) is not supported")
  n_layers = _get(t, "num_hidden_layers", _TEXT_DEFAULTS)
  layer_types = t.get("layer_types")
  if layer_types is None:
    layer_types = layer_types_from_pattern(n_layers, t.get("sliding_window_pattern") or 6)
  window = t.get("sliding_window", _TEXT_DEFAULTS["sliding_window"])
  if window is None and SLIDING in layer_types:
    raise ConversionError("config has sliding-attention layers but sliding_window is null")
  if t.get("attn_logit_softcapping") is not None:
    # transformers 5.24's Gemma3Attention stores it but never passes it to the attention.
    log.warning("attn_logit_softcapping=%s is ignored, as transformers ignores it for Gemma 3",
                t["attn_logit_softcapping"])
  softcap = t.get("final_logit_softcapping")
  if softcap is not None and not causal_lm:
    log.warning("final_logit_softcapping=%s is ignored: Gemma3ForConditionalGeneration does not apply it", softcap)
    softcap = None
  rope = _rope(t)
  hidden = _get(t, "hidden_size", _TEXT_DEFAULTS)
  heads = _get(t, "num_attention_heads", _TEXT_DEFAULTS)
  if tie_word_embeddings is None:
    tie_word_embeddings = t.get("tie_word_embeddings", True)
  return Gemma3TextConfig(
      vocab_size=_get(t, "vocab_size", _TEXT_DEFAULTS), hidden_size=hidden, num_layers=n_layers,
      num_heads=heads, num_kv_heads=_get(t, "num_key_value_heads", _TEXT_DEFAULTS),
      head_dim=t.get("head_dim") or _TEXT_DEFAULTS["head_dim"],
      intermediate_size=_get(t, "intermediate_size", _TEXT_DEFAULTS), layer_types=tuple(layer_types),
      sliding_window=int(window or 0), query_pre_attn_scalar=float(_get(t, "query_pre_attn_scalar", _TEXT_DEFAULTS)),
      rope_global_theta=rope[FULL][0], rope_global_linear_factor=rope[FULL][1],
      rope_local_theta=rope[SLIDING][0], rope_local_linear_factor=rope[SLIDING][1],
      rms_norm_eps=float(_get(t, "rms_norm_eps", _TEXT_DEFAULTS)),
      hidden_act=_get(t, "hidden_activation", _TEXT_DEFAULTS),
      attention_bias=bool(_get(t, "attention_bias", _TEXT_DEFAULTS)),
      tie_word_embeddings=bool(tie_word_embeddings), final_logit_softcapping=softcap,
      bos_token_id=t.get("bos_token_id", _TEXT_DEFAULTS["bos_token_id"]),
      eos_token_ids=_ids(eos_token_id if eos_token_id is not None else t.get("eos_token_id", 1)),
      pad_token_id=t.get("pad_token_id", _TEXT_DEFAULTS["pad_token_id"]))


def vision_config_from_hf(v: dict) -> SiglipVisionConfig:
  """Builds the SigLIP config from a `SiglipVisionConfig`-style dict."""
  hf_fields.audit(v, hf_fields.SIGLIP_VISION, "config.json vision_config")
  if _get(v, "vision_use_head", _VISION_DEFAULTS):
    raise ConversionError("vision_config.vision_use_head is true (the default of SiglipVisionConfig); Gemma 3 "
                          "never uses SigLIP's pooling head and its checkpoints set it false")
  size, patch = _get(v, "image_size", _VISION_DEFAULTS), _get(v, "patch_size", _VISION_DEFAULTS)
  if isinstance(size, (list, tuple)) or isinstance(patch, (list, tuple)):
    raise ConversionError(f"non-square image_size / patch_size ({size}, {patch}) are not supported")
  def get(key):
    return _get(v, key, _VISION_DEFAULTS)
  return SiglipVisionConfig(
      hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
      num_heads=get("num_attention_heads"), image_size=size, patch_size=patch, num_channels=get("num_channels"),
      layer_norm_eps=float(get("layer_norm_eps")), hidden_act=get("hidden_act"))


def _as_conversion_error(fn):
  """Config validation errors (ValueError) surface as ConversionError, which the CLI reports."""
  def wrapped(hf: dict):
    try:
      return fn(hf)
    except ConversionError:
      raise
    except ValueError as e:
      raise ConversionError(f"config.json: {e}") from e
  wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
  return wrapped


@_as_conversion_error
def config_from_hf(hf: dict) -> Gemma3Config:
  """`Gemma3ForConditionalGeneration` config.json -> `Gemma3Config`."""
  hf_fields.audit(hf, hf_fields.GEMMA3_TOP, "config.json")
  text = text_config_from_hf(hf.get("text_config") or {}, causal_lm=False,
                             tie_word_embeddings=hf.get("tie_word_embeddings", True),
                             eos_token_id=hf.get("eos_token_id"))
  def idx(name, default):
    v = hf.get(name, hf.get(name.replace("_index", "_id")))
    return default if v is None else v
  return Gemma3Config(text=text, vision=vision_config_from_hf(hf.get("vision_config") or {}),
                      mm_tokens_per_image=hf.get("mm_tokens_per_image") or 256,
                      image_token_id=idx("image_token_index", 262_144), boi_token_id=idx("boi_token_index", 255_999),
                      eoi_token_id=idx("eoi_token_index", 256_000))


@_as_conversion_error
def causal_lm_config_from_hf(hf: dict) -> Gemma3TextConfig:
  """`Gemma3ForCausalLM` config.json -> `Gemma3TextConfig`."""
  return text_config_from_hf(hf, causal_lm=True)


# ----------------------------------------------------------------------------------------------
# jaxdpo config -> config.json (models initialised from a preset carry no source config.json)


def _rope_to_hf(theta: float, factor: float) -> dict:
  if factor == 1.0:
    return {"rope_type": "default", "rope_theta": theta}
  return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def text_config_to_hf(cfg: Gemma3TextConfig, *, causal_lm: bool) -> dict:
  """A `Gemma3TextConfig` dict (transformers 5 form: `layer_types`, `rope_parameters` per layer type).

  Args:
    cfg: the decoder config.
    causal_lm: whether it is for `Gemma3ForCausalLM` (config.json itself, softcapping honoured)
      or the `text_config` of the multimodal model, which never applies softcapping.

  Raises:
    ConversionError: a multimodal config with `final_logit_softcapping` set (transformers would
      not apply it, so the export would compute other logits), or a fractional
      `query_pre_attn_scalar` (transformers takes an int).
  """
  if cfg.final_logit_softcapping is not None and not causal_lm:
    raise ConversionError(f"final_logit_softcapping={cfg.final_logit_softcapping}: "
                          "Gemma3ForConditionalGeneration does not apply it, so the export would differ")
  if cfg.query_pre_attn_scalar != int(cfg.query_pre_attn_scalar):
    raise ConversionError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: transformers' Gemma3TextConfig "
                          "takes an integer")
  eos = list(cfg.eos_token_ids)
  return {
      "model_type": "gemma3_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
      "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar),
      "rope_parameters": {FULL: _rope_to_hf(cfg.rope_global_theta, cfg.rope_global_linear_factor),
                          SLIDING: _rope_to_hf(cfg.rope_local_theta, cfg.rope_local_linear_factor)},
      "rms_norm_eps": cfg.rms_norm_eps, "hidden_activation": cfg.hidden_act, "attention_bias": cfg.attention_bias,
      "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_word_embeddings,
      "final_logit_softcapping": cfg.final_logit_softcapping, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": cfg.pad_token_id, "dtype": "float32",
  }


def causal_lm_config_to_hf(cfg: Gemma3TextConfig) -> dict:
  """`Gemma3TextConfig` -> a `Gemma3ForCausalLM` config.json (inverse of `causal_lm_config_from_hf`)."""
  return {"architectures": ["Gemma3ForCausalLM"], **text_config_to_hf(cfg, causal_lm=True)}


def config_to_hf(cfg: Gemma3Config) -> dict:
  """`Gemma3Config` -> a `Gemma3ForConditionalGeneration` config.json (inverse of `config_from_hf`)."""
  text, v = text_config_to_hf(cfg.text, causal_lm=False), cfg.vision
  vision = {
      "model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
      "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
      "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
      "hidden_act": v.hidden_act, "vision_use_head": False, "attention_dropout": 0.0,
  }
  return {
      "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "dtype": "float32",
      "text_config": text, "vision_config": vision, "mm_tokens_per_image": cfg.mm_tokens_per_image,
      "image_token_index": cfg.image_token_id, "boi_token_index": cfg.boi_token_id,
      "eoi_token_index": cfg.eoi_token_id, "tie_word_embeddings": cfg.text.tie_word_embeddings,
      "eos_token_id": text["eos_token_id"],
  }


# ----------------------------------------------------------------------------------------------
# Rules


def _vocab_checked(cfg: Gemma3TextConfig, what: str):
  """to_jax for a [V, D] table that explains a vocabulary-size mismatch instead of a bare shape."""
  def to_jax(w):
    if w.ndim == 2 and w.shape[0] != cfg.vocab_size:
      raise ValueError(
          f"{what} has {w.shape[0]} rows but config.json says vocab_size={cfg.vocab_size}. Gemma 3 multimodal "
          "checkpoints have 262208 rows (262144 tokens + the image token and padding rows); exports with 262144 "
          "rows exist. Fix config.json's vocab_size to match the weights (rows are never dropped or invented)")
    return w
  return to_jax


def text_rules(cfg: Gemma3TextConfig, hf_prefix: str, jax_prefix: str = "") -> list[Rule]:
  """Rules for the decoder; `hf_prefix` is where it lives in the canonical HF layout."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  p, j = re.escape(hf_prefix), jax_prefix
  layer = p + r"layers\.(\d+)\."
  attn = layer + r"self_attn\."
  rules = [
      Rule(p + r"embed_tokens\.weight", j + "embed_tokens", _vocab_checked(cfg, "embed_tokens"), identity),
      Rule(p + r"norm\.weight", j + "norm.weight"),
      Rule(attn + r"q_proj\.weight", j + "layers.{0}.self_attn.q.kernel", *linear_in(n, h)),
      Rule(attn + r"k_proj\.weight", j + "layers.{0}.self_attn.k.kernel", *linear_in(k, h)),
      Rule(attn + r"v_proj\.weight", j + "layers.{0}.self_attn.v.kernel", *linear_in(k, h)),
      Rule(attn + r"o_proj\.weight", j + "layers.{0}.self_attn.o.kernel", *linear_out(n, h)),
      Rule(attn + r"q_norm\.weight", j + "layers.{0}.self_attn.q_norm.weight"),
      Rule(attn + r"k_norm\.weight", j + "layers.{0}.self_attn.k_norm.weight"),
      Rule(layer + r"mlp\.gate_proj\.weight", j + "layers.{0}.mlp.gate.kernel", *linear_in(cfg.intermediate_size)),
      Rule(layer + r"mlp\.up_proj\.weight", j + "layers.{0}.mlp.up.kernel", *linear_in(cfg.intermediate_size)),
      Rule(layer + r"mlp\.down_proj\.weight", j + "layers.{0}.mlp.down.kernel", *linear_in(d)),
  ]
  for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"):
    rules.append(Rule(layer + norm + r"\.weight", j + "layers.{0}." + norm + ".weight"))
  if cfg.attention_bias:
    rules += [
        Rule(attn + r"q_proj\.bias", j + "layers.{0}.self_attn.q.bias", *reshape(n, h)),
        Rule(attn + r"k_proj\.bias", j + "layers.{0}.self_attn.k.bias", *reshape(k, h)),
        Rule(attn + r"v_proj\.bias", j + "layers.{0}.self_attn.v.bias", *reshape(k, h)),
        Rule(attn + r"o_proj\.bias", j + "layers.{0}.self_attn.o.bias"),
    ]
  if not cfg.tie_word_embeddings:
    rules.append(Rule(r"lm_head\.weight", j + "lm_head", _vocab_checked(cfg, "lm_head"), identity))
  return rules


def _conv_to_jax(w):
  return np.ascontiguousarray(w.transpose(1, 2, 3, 0))  # [D, C, p, q] -> [C, p, q, D]


def _conv_to_hf(k):
  return np.ascontiguousarray(k.transpose(3, 0, 1, 2))


def vision_rules(cfg: SiglipVisionConfig, hf_prefix: str = "model.vision_tower.",
                 jax_prefix: str = "vision_tower.") -> list[Rule]:
  """Rules for the SigLIP tower."""
  d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  p, j = re.escape(hf_prefix), jax_prefix
  emb = p + r"embeddings\."
  layer = p + r"encoder\.layers\.(\d+)\."
  attn = layer + r"self_attn\."
  rules = [
      Rule(emb + r"patch_embedding\.weight", j + "embeddings.kernel", _conv_to_jax, _conv_to_hf),
      Rule(emb + r"patch_embedding\.bias", j + "embeddings.bias"),
      Rule(emb + r"position_embedding\.weight", j + "embeddings.position_embedding"),
      Rule(p + r"post_layernorm\.weight", j + "post_layernorm.weight"),
      Rule(p + r"post_layernorm\.bias", j + "post_layernorm.bias"),
      Rule(attn + r"out_proj\.weight", j + "layers.{0}.self_attn.o.kernel", *linear_out(n, h)),
      Rule(attn + r"out_proj\.bias", j + "layers.{0}.self_attn.o.bias"),
      Rule(layer + r"mlp\.fc1\.weight", j + "layers.{0}.mlp.fc1.kernel", *linear_in(f)),
      Rule(layer + r"mlp\.fc1\.bias", j + "layers.{0}.mlp.fc1.bias"),
      Rule(layer + r"mlp\.fc2\.weight", j + "layers.{0}.mlp.fc2.kernel", *linear_in(d)),
      Rule(layer + r"mlp\.fc2\.bias", j + "layers.{0}.mlp.fc2.bias"),
  ]
  for name in ("q", "k", "v"):
    rules.append(Rule(attn + name + r"_proj\.weight", j + "layers.{0}.self_attn." + name + ".kernel",
                      *linear_in(n, h)))
    rules.append(Rule(attn + name + r"_proj\.bias", j + "layers.{0}.self_attn." + name + ".bias", *reshape(n, h)))
  for norm in ("layer_norm1", "layer_norm2"):
    for w in ("weight", "bias"):
      rules.append(Rule(layer + norm + r"\." + w, j + "layers.{0}." + norm + "." + w))
  return rules


def rules(cfg: Gemma3Config) -> list[Rule]:
  """The full `Gemma3ForConditionalGeneration` table over canonical (transformers 5) keys."""
  projector = [
      # A raw [vision width, text width] parameter used with matmul: no transpose.
      Rule(r"model\.multi_modal_projector\.mm_input_projection_weight", "multi_modal_projector.mm_input_projection"),
      Rule(r"model\.multi_modal_projector\.mm_soft_emb_norm\.weight",
           "multi_modal_projector.mm_soft_emb_norm.weight"),
  ]
  return (text_rules(cfg.text, "model.language_model.", "language_model.") + vision_rules(cfg.vision)
          + projector)


def causal_lm_rules(cfg: Gemma3TextConfig) -> list[Rule]:
  """The `Gemma3ForCausalLM` table."""
  return text_rules(cfg, "model.")


# Legacy prefix -> canonical prefix, first match wins (longest prefixes first).
_VLM_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


# Non-persistent buffers some exports still contain: rotary tables and SigLIP's position ids.
_BUFFERS = (ROTARY_BUFFER, "embeddings.position_ids")


def normalize_key(cfg: Gemma3Config):
  """Key normaliser for `Gemma3ForConditionalGeneration` checkpoints (every layout above)."""
  return key_normalizer(_VLM_PREFIXES, tied=cfg.text.tie_word_embeddings, buffer_suffixes=_BUFFERS)


def causal_lm_normalize_key(cfg: Gemma3TextConfig):
  """Key normaliser for `Gemma3ForCausalLM` checkpoints."""
  return key_normalizer(tied=cfg.tie_word_embeddings, buffer_suffixes=_BUFFERS)
