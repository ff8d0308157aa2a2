"""Gemma 3 converters: bit-exact round trips in every key layout, clean `from_pretrained`,
config parsing against transformers, and refusal of mismatched vocabularies."""

from __future__ import annotations

import contextlib
import io as std_io
import logging
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import _gemma_helpers as H
from jaxdpo.cli import convert as cli
from jaxdpo.models import convert_table, io
from jaxdpo.models.gemma3 import config as gcfg
from jaxdpo.models.gemma3 import convert as gconv


@contextlib.contextmanager
def captured_transformers_log():
  """Collects everything transformers logs at WARNING and above."""
  buf = std_io.StringIO()
  handler = logging.StreamHandler(buf)
  logger = logging.getLogger("transformers")
  old = transformers.utils.logging.get_verbosity()
  transformers.utils.logging.set_verbosity_warning()
  logger.addHandler(handler)
  try:
    yield buf
  finally:
    logger.removeHandler(handler)
    transformers.utils.logging.set_verbosity(old)


def _load_clean(cls, path):
  with captured_transformers_log() as log:
    model, info = cls.from_pretrained(path, output_loading_info=True)
  return model, info, log.getvalue()


def _read_all(hf_dir):
  out = {}
  for path in convert_table.list_shards(hf_dir):
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
  return out


@pytest.fixture(scope="module")
def vlm():
  return H.tiny_vlm(seed=0)


@pytest.mark.parametrize("layout", ["save_pretrained", "tf5", "hub", "tf4"])
def test_round_trip_is_bit_exact(vlm, layout, tmp_path):
  """HF (any layout) -> jaxdpo -> HF (transformers 5 layout): every tensor identical, and
  transformers loads the result without missing / unexpected keys or warnings."""
  src = str(tmp_path / "src")
  # The hub layout also carries a copy of the tied head, which must be ignored, not kept.
  H.save_in_layout(vlm, src, layout, keep_tied_head=(layout == "hub"))
  assert cli.main(["hf-to-jax", "--hf-dir", src, "--out", str(tmp_path / "ck"), "--no-tokenizer"]) == 0
  assert cli.main(["jax-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]) == 0
  written = _read_all(str(tmp_path / "out"))
  reference = {k: v.detach().numpy() for k, v in vlm.state_dict().items() if k != "lm_head.weight"}
  assert sorted(written) == sorted(reference)
  for key, value in reference.items():
    assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key
  reloaded, info, log = _load_clean(transformers.Gemma3ForConditionalGeneration, str(tmp_path / "out"))
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert "MISSING" not in log and "UNEXPECTED" not in log and "LOAD REPORT" not in log, log
  for key, value in vlm.state_dict().items():
    assert torch.equal(reloaded.state_dict()[key], value), key


def test_log_capture_sees_load_problems(vlm, tmp_path):
  """Control for the test above: a missing and an unexpected key do show up."""
  H.save_in_layout(vlm, str(tmp_path / "bad"), "tf5", drop=("model.language_model.norm.weight",),
                   extra={"model.extra.weight": torch.zeros(2)})
  _, info, log = _load_clean(transformers.Gemma3ForConditionalGeneration, str(tmp_path / "bad"))
  assert info["missing_keys"] == {"model.language_model.norm.weight"}
  assert "MISSING" in log and "UNEXPECTED" in log


def test_causal_lm_round_trip(tmp_path):
  hf = H.tiny_causal_lm(seed=1, attention_bias=True)
  H.save_in_layout(hf, str(tmp_path / "src"), "save_pretrained")
  io.hf_to_jax_dir(str(tmp_path / "src"), str(tmp_path / "ck"))
  family, cfg = io.read_model_meta(str(tmp_path / "ck"))
  assert family.name == "gemma3_text" and cfg.num_layers == 7
  io.jax_to_hf_dir(str(tmp_path / "ck"), str(tmp_path / "out"))
  reloaded, info, log = _load_clean(transformers.Gemma3ForCausalLM, str(tmp_path / "out"))
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert "LOAD REPORT" not in log, log
  for key, value in hf.state_dict().items():
    assert torch.equal(reloaded.state_dict()[key], value), key


@pytest.mark.parametrize("embed_rows,config_vocab", [(331 - 64, 331), (331, 331 - 64)],
                         ids=["weights_short", "weights_long"])
def test_vocab_mismatch_is_refused(tmp_path, embed_rows, config_vocab):
  """The 262144-vs-262208 trap, emulated: config.json and the embedding disagree by 64 rows."""
  hf = H.tiny_vlm(seed=2, text_overrides=dict(vocab_size=embed_rows))
  src = str(tmp_path / "src")
  H.save_in_layout(hf, src, "tf5")
  H.edit_config(src, lambda c: c["text_config"].update(vocab_size=config_vocab))
  with pytest.raises(convert_table.ConversionError) as err:
    io.hf_to_jax_dir(src, str(tmp_path / "ck"))
  msg = str(err.value)
  assert "model.language_model.embed_tokens.weight" in msg
  assert f"has {embed_rows} rows but config.json says vocab_size={config_vocab}" in msg
  assert "262208" in msg
  assert not os.path.exists(tmp_path / "ck")  # nothing half-written
  # The CLI reports the same thing and exits non-zero.
  assert cli.main(["hf-to-jax", "--hf-dir", src, "--out", str(tmp_path / "ck2"), "--no-tokenizer"]) == 2
  assert not os.path.exists(tmp_path / "ck2")


def test_bad_keys_are_all_listed(vlm, tmp_path):
  src = str(tmp_path / "src")
  H.save_in_layout(vlm, src, "hub", drop=("language_model.model.layers.3.self_attn.q_norm.weight",),
                   extra={"vision_tower.vision_model.head.probe": torch.zeros(1, 1, 30)})
  with pytest.raises(convert_table.ConversionError) as err:
    io.hf_to_jax_dir(src, str(tmp_path / "ck"))
  msg = str(err.value)
  assert "vision_tower.vision_model.head.probe" in msg
  assert "language_model.layers.3.self_attn.q_norm.weight" in msg


def _hf_text_config(**kw):
  return transformers.Gemma3TextConfig(**kw)


def test_config_parsing_matches_transformers_in_both_formats():
  """Legacy (rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern) and
  transformers-5 (layer_types / rope_parameters) configs parse to what transformers resolves."""
  legacy = dict(num_hidden_layers=8, rope_theta=5e5, rope_local_base_freq=2e4, sliding_window_pattern=3,
                rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window=7, hidden_size=48,
                num_attention_heads=4, num_key_value_heads=2, head_dim=12)
  ours_legacy = gconv.text_config_from_hf(legacy, causal_lm=True)
  resolved = _hf_text_config(**legacy).to_dict()
  ours_new = gconv.text_config_from_hf(resolved, causal_lm=True)
  assert ours_legacy == ours_new
  assert list(ours_new.layer_types) == resolved["layer_types"]
  assert ours_new.layer_types.count("full_attention") == 2  # layers 2 and 5 (pattern 3)
  rp = resolved["rope_parameters"]
  assert (ours_new.rope_global_theta, ours_new.rope_global_linear_factor) == (rp["full_attention"]["rope_theta"], 4.0)
  assert ours_new.rope_local_theta == rp["sliding_attention"]["rope_theta"] == 2e4
  assert ours_new.rope_local_linear_factor == 1.0


def test_config_traps_are_explicit():
  # transformers 5.24 silently ignores {"type": "linear"} here; we refuse to guess.
  with pytest.raises(convert_table.ConversionError, match="rope_type"):
    gconv.text_config_from_hf({"rope_scaling": {"type": "linear", "factor": 8.0}}, causal_lm=True)
  vision = H.GEMMA3_4B_IT_CONFIG["vision_config"]
  with pytest.raises(convert_table.ConversionError, match="vision_use_head"):
    gconv.config_from_hf({"text_config": {}, "vision_config": dict(vision, vision_use_head=True)})
  with pytest.raises(convert_table.ConversionError, match="yarn"):
    gconv.text_config_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, causal_lm=True)
  # Gemma3ForConditionalGeneration never soft-caps its logits; Gemma3ForCausalLM does.
  assert gconv.config_from_hf({"text_config": {"final_logit_softcapping": 30.0},
                               "vision_config": vision}).text.final_logit_softcapping is None
  assert gconv.causal_lm_config_from_hf({"final_logit_softcapping": 30.0}).final_logit_softcapping == 30.0


def test_gemma3_4b_it_config_parses_to_the_preset():
  cfg = gconv.config_from_hf(H.GEMMA3_4B_IT_CONFIG)
  assert cfg == gcfg.gemma3_4b()
  assert cfg.text.layer_types.count("full_attention") == 5  # layers 5, 11, 17, 23, 29
  assert cfg.pool_kernel == 4 and cfg.vision.num_patches == 4096


def test_untied_head_round_trip(tmp_path):
  """A (hypothetical) untied checkpoint keeps its own lm_head through both directions."""
  hf = H.tiny_vlm(seed=3)
  hf.config.tie_word_embeddings = False
  untied = transformers.Gemma3ForConditionalGeneration(hf.config)
  untied.load_state_dict(hf.state_dict())
  with torch.no_grad():
    untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight))
  H.save_in_layout(untied, str(tmp_path / "src"), "hub")
  assert "language_model.lm_head.weight" in _read_all(str(tmp_path / "src"))
  io.hf_to_jax_dir(str(tmp_path / "src"), str(tmp_path / "ck"))
  _, cfg = io.read_model_meta(str(tmp_path / "ck"))
  assert not cfg.text.tie_word_embeddings
  io.jax_to_hf_dir(str(tmp_path / "ck"), str(tmp_path / "out"))
  written = _read_all(str(tmp_path / "out"))
  assert np.array_equal(written["lm_head.weight"], untied.lm_head.weight.detach().numpy())
  assert not np.array_equal(written["lm_head.weight"], written["model.language_model.embed_tokens.weight"])


def test_invalid_config_is_a_conversion_error():
  cfg = dict(H.GEMMA3_4B_IT_CONFIG, mm_tokens_per_image=250)
  with pytest.raises(convert_table.ConversionError, match="not a square"):
    gconv.config_from_hf(cfg)
