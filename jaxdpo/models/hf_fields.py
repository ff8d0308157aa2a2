"""What each family does with every field of an HF config.json: honoured, refused or ignored.

A converter that reads the shape fields and skips the rest converts a checkpoint whose math it
does not implement (YaRN rope, a sliding window, dropout) without complaint, and the model is
then silently wrong. So every family keeps a `FieldTable` of the fields transformers 5.24
defines for it, each in one of three classes:

  * honoured: read into the jaxdpo config and implemented exactly;
  * checked: honoured for the values we implement, refused (with the field named) otherwise;
  * ignored: cannot change the forward or backward pass (bookkeeping, generation defaults, or a
    field transformers itself ignores for this architecture), with the reason.

`audit` applies a table to a config dict before anything is converted. A field the table does
not know is logged as a warning naming it: it may be harmless metadata or a new feature.
`tests/test_hf_fields.py` checks that every field of transformers' own config classes is
classified, and converts a checkpoint with each refused value through the CLI.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from jaxdpo.models.convert_table import ConversionError

log = logging.getLogger(__name__)

# A check returns None when the value is one we implement, else the reason it is refused.
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class FieldTable:
  """One family's classification of HF config fields (see the module docstring)."""

  name: str
  honoured: tuple[str, ...]
  checked: dict[str, Check]
  ignored: dict[str, str]

  def known(self) -> set[str]:
    return set(self.honoured) | set(self.checked) | set(self.ignored)


def audit(config: dict, table: FieldTable, where: str) -> None:
  """Refuses `config` if any field has a value we do not implement; warns about unknown fields.

  Args:
    config: one (sub-)config dict of config.json.
    table: the family's field table.
    where: how to name the dict in messages, e.g. "config.json text_config".

  Raises:
    ConversionError: naming the first refused field, its value and why.
  """
  for field, check in table.checked.items():
    if field in config:
      reason = check(config[field])
      if reason is not None:
        raise ConversionError(f"{where}: {field}={config[field]!r} is not supported ({reason}); "
                              "nothing was converted")
  unknown = sorted(set(config) - table.known())
  if unknown:
    log.warning("%s: fields %s are not known to the %s converter and were not read; check that they do not "
                "change the model", where, unknown, table.name)


def markdown(table: FieldTable) -> str:
  """The table as a Markdown list (BUILD_NOTES keeps a copy)."""
  lines = [f"**{table.name}**", "", f"- honoured: {', '.join(sorted(table.honoured))}",
           f"- honoured for supported values, else refused: {', '.join(sorted(table.checked))}",
           "- ignored as irrelevant:"]
  by_reason: dict[str, list[str]] = {}
  for field, why in table.ignored.items():
    by_reason.setdefault(why, []).append(field)
  lines += [f"  - {', '.join(sorted(fields))}: {why}" for why, fields in by_reason.items()]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Checks shared by the families


def refuse_if_present(why: str) -> Check:
  return lambda value: why if value not in (None, {}, []) else None


def zero_dropout(value) -> str | None:
  return None if not value else "dropout is not implemented; training would differ from transformers"


def supported_activation(value) -> str | None:
  from jaxdpo.models import layers  # local: keeps this module importable without jax set up
  try:
    layers.activation(value)
  except ValueError as e:
    return str(e)
  return None


def is_false(why: str) -> Check:
  return lambda value: why if value else None


def full_attention_only(value) -> str | None:
  bad = sorted({t for t in value or () if t != "full_attention"})
  return None if not bad else f"layer types {bad} are not implemented for this family (full attention only)"


def rope_types(*allowed: str) -> Check:
  """Accepts a rope dict whose type is one of `allowed`, with no partial rotary or interleaving."""
  def check(rope):
    if not rope:
      return None
    if not isinstance(rope, dict):
      return "expected a dict"
    kinds = {rope[k] for k in ("rope_type", "type") if k in rope}
    bad = sorted(kinds - set(allowed))
    if bad:
      return f"rope type {bad[0]!r} is not implemented; supported: {list(allowed)}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      return "partial_rotary_factor is not implemented"
    if rope.get("mrope_interleaved"):
      return "interleaved M-RoPE is not implemented"
    return None
  return check


# Fields every transformers config carries that cannot change the math.
_BOOKKEEPING = "bookkeeping, no effect on the math"
COMMON_IGNORED = {name: _BOOKKEEPING for name in (
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
    "model_type", "output_attentions", "use_cache", "initializer_range", "_attn_implementation_autoset",
    "attn_implementation", "_attn_implementation", "tokenizer_class", "use_return_dict")}
COMMON_IGNORED.update({
    "bos_token_id": "a token id; the model does not use it",
    "max_position_embeddings": "only sizes rotary caches and dynamic rope scaling, which is refused",
})
COMMON_CHECKED = {"quantization_config": refuse_if_present("quantized checkpoints are not supported")}


# ----------------------------------------------------------------------------------------------
# Qwen2 / Qwen2.5 text decoder (Qwen2ForCausalLM, and the decoder of Qwen2.5-VL)

QWEN2_TEXT = FieldTable(
    name="Qwen2 text decoder",
    honoured=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
              "eos_token_id", "pad_token_id"),
    checked={
        **COMMON_CHECKED,
        "hidden_act": supported_activation,
        # M-RoPE (`mrope_section`) and plain RoPE are implemented; linear, dynamic, yarn, longrope,
        # llama3 scaling are not. Legacy Qwen2.5-VL configs write {"type": "mrope", ...}.
        "rope_parameters": rope_types("default", "mrope"),
        "rope_scaling": rope_types("default", "mrope"),
        "use_sliding_window": is_false("sliding-window attention is not implemented for Qwen2"),
        "layer_types": full_attention_only,
        "attention_dropout": zero_dropout,
    },
    ignored={
        **COMMON_IGNORED,
        "sliding_window": "read by transformers only when use_sliding_window is true (refused)",
        "max_window_layers": "read by transformers only when use_sliding_window is true (refused)",
        "attention_bias": "not a Qwen2 field: transformers always uses q/k/v biases and no o bias; the "
                          "checkpoint's keys are checked against that",
        "mlp_bias": "not a Qwen2 field: transformers' Qwen2 MLP has no biases (unexpected keys are refused)",
        "pretraining_tp": "not a Qwen2 field; transformers ignores it",
    },
)

# Top-level fields of a Qwen2.5-VL config.json besides the (legacy, flat) text fields.
QWEN2_5_VL_TOP = FieldTable(
    name="Qwen2.5-VL",
    honoured=("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
              "tie_word_embeddings", "text_config", "vision_config"),
    checked=dict(COMMON_CHECKED),
    ignored={**COMMON_IGNORED, "vision_token_id": "a token id only the processor uses"},
)

QWEN2_5_VL_VISION = FieldTable(
    name="Qwen2.5-VL vision tower",
    honoured=("depth", "num_hidden_layers", "hidden_size", "intermediate_size", "num_heads",
              "num_attention_heads", "out_hidden_size", "patch_size", "spatial_patch_size", "temporal_patch_size",
              "spatial_merge_size", "window_size", "fullatt_block_indexes", "in_channels", "in_chans",
              "tokens_per_second", "rope_theta"),
    checked={
        "hidden_act": supported_activation,
        "rope_parameters": rope_types("axial", "default"),
        "attention_dropout": zero_dropout,
    },
    ignored={**COMMON_IGNORED, "embed_dim": "a legacy alias transformers does not read for Qwen2.5-VL",
             "num_position_embeddings": "not used by the Qwen2.5-VL vision tower (2D RoPE, no table)"},
)

# ----------------------------------------------------------------------------------------------
# Gemma 3 (text decoder, SigLIP tower, multimodal top level)

GEMMA3_TEXT = FieldTable(
    name="Gemma 3 text decoder",
    honoured=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "query_pre_attn_scalar", "sliding_window",
              "layer_types", "sliding_window_pattern", "_sliding_window_pattern", "rope_theta",
              "rope_local_base_freq", "attention_bias", "tie_word_embeddings", "final_logit_softcapping",
              "eos_token_id", "pad_token_id", "bos_token_id"),
    checked={
        **COMMON_CHECKED,
        "hidden_activation": supported_activation,
        # Per layer type: "default" and "linear" are implemented (the parser refuses the rest,
        # naming the layer type); legacy `rope_scaling` likewise.
        "rope_parameters": lambda p: None,
        "rope_scaling": rope_types("default", "linear"),
        "use_bidirectional_attention": is_false("bidirectional attention (embedding models) is not implemented"),
        "attention_dropout": zero_dropout,
    },
    ignored={
        **{k: v for k, v in COMMON_IGNORED.items() if k != "bos_token_id"},
        "attn_logit_softcapping": "transformers 5.24 stores it but never applies it for Gemma 3 (a warning is "
                                  "logged)",
        "hidden_act": "legacy name; Gemma3TextConfig reads hidden_activation",
        "cache_implementation": "generation cache layout only",
    },
)

SIGLIP_VISION = FieldTable(
    name="SigLIP vision tower (Gemma 3)",
    honoured=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "num_channels", "layer_norm_eps"),
    checked={
        "hidden_act": supported_activation,
        "vision_use_head": lambda v: None,  # refused by the parser when true (also its default)
        "attention_dropout": zero_dropout,
    },
    ignored={**COMMON_IGNORED, "projection_dim": "SigLIP's contrastive head size, not used by Gemma 3"},
)

GEMMA3_TOP = FieldTable(
    name="Gemma 3 multimodal",
    honoured=("text_config", "vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
              "image_token_index", "boi_token_id", "eoi_token_id", "image_token_id", "tie_word_embeddings",
              "eos_token_id"),
    checked=dict(COMMON_CHECKED),
    ignored={**COMMON_IGNORED, "pad_token_id": "a token id; the model does not use it",
             "bos_token_id": "a token id; the model does not use it"},
)

TABLES = (QWEN2_TEXT, QWEN2_5_VL_TOP, QWEN2_5_VL_VISION, GEMMA3_TEXT, SIGLIP_VISION, GEMMA3_TOP)
