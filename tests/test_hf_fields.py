"""Converters refuse config fields whose math they do not implement, naming the field, writing nothing.

Every refused value is converted through the CLI from a tiny checkpoint that converts cleanly
without the edit (the control), so a refusal cannot come from something else being broken.
"""

from __future__ import annotations

import contextlib
import copy
import io as std_io
import json
import os
import shutil
import subprocess
import sys

import pytest

import _gemma_helpers as G
import _qwen_vl_helpers as Q
from _dpo_helpers import ROOT
from jaxdpo.cli import convert as cli
from jaxdpo.models import hf_fields


def test_every_transformers_field_is_classified():
  """Each field transformers 5.24 defines for a family is honoured, checked or ignored-with-reason."""
  from transformers import Gemma3Config, Gemma3TextConfig, Qwen2Config, SiglipVisionConfig
  from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as qvl
  cases = [(Qwen2Config(), hf_fields.QWEN2_TEXT), (qvl.Qwen2_5_VLTextConfig(), hf_fields.QWEN2_TEXT),
           (qvl.Qwen2_5_VLVisionConfig(), hf_fields.QWEN2_5_VL_VISION), (qvl.Qwen2_5_VLConfig(), hf_fields.QWEN2_5_VL_TOP),
           (Gemma3TextConfig(), hf_fields.GEMMA3_TEXT), (SiglipVisionConfig(), hf_fields.SIGLIP_VISION),
           (Gemma3Config(), hf_fields.GEMMA3_TOP)]
  for config, table in cases:
    unclassified = sorted(set(config.to_dict()) - table.known())
    assert not unclassified, (table.name, unclassified)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Tiny HF checkpoints of each family: Qwen2, Qwen2.5-VL, Gemma 3 multimodal."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  d = tmp_path_factory.mktemp("fields")
  torch.manual_seed(0)
  qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=24, max_position_embeddings=64))
  qwen2.save_pretrained(str(d / "qwen2"))
  Q.build_hf_model(str(d / "qwen2_5_vl"), depth=2, fullatt=(1,))
  G.save_in_layout(G.tiny_vlm(seed=0), str(d / "gemma3"), "save_pretrained")
  return {name: str(d / name) for name in ("qwen2", "qwen2_5_vl", "gemma3")}


def _edited(src: str, dst: str, edit) -> str:
  shutil.copytree(src, dst)
  G.edit_config(dst, edit)
  return dst


def _convert(hf_dir: str, out: str) -> tuple[int, str]:
  err = std_io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = cli.main(["hf-to-jax", "--hf-dir", hf_dir, "--out", out, "--no-tokenizer"])  # weights only
  return rc, err.getvalue()


def _set(*path_and_value):
  """An edit that sets config[path...] = value, creating nested dicts."""
  *path, value = path_and_value
  def edit(cfg):
    node = cfg
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = copy.deepcopy(value)
  return edit


def _rope(**kw):
  """A Qwen2.5-VL text rope dict with M-RoPE kept and a scaling added."""
  return {"mrope_section": [2, 2, 2], "rope_theta": 10000.0, **kw}


def _flat(edit):
  """The legacy flat Qwen2.5-VL form (text fields at the top level, as the Hub's 3B config), then `edit`."""
  def flatten_then_edit(cfg):
    cfg.update(cfg.pop("text_config"))
    edit(cfg)
  return flatten_then_edit


REFUSED = {
    # Qwen2 text (Qwen2ForCausalLM): the cases and every other checked field.
    "qwen2-linear": ("qwen2", _set("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
                     "rope_parameters"),
    "qwen2-yarn": ("qwen2", _set("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                     "original_max_position_embeddings": 32}), "rope_parameters"),
    "qwen2-dynamic": ("qwen2", _set("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                      "rope_parameters"),
    "qwen2-legacy-rope-scaling": ("qwen2", _set("rope_scaling", {"type": "yarn", "factor": 4.0}), "rope_scaling"),
    "qwen2-sliding": ("qwen2", _set("use_sliding_window", True), "use_sliding_window"),
    "qwen2-sliding-layer-types": ("qwen2", _set("layer_types", ["sliding_attention"]), "layer_types"),
    "qwen2-activation": ("qwen2", _set("hidden_act", "relu"), "hidden_act"),
    "qwen2-dropout": ("qwen2", _set("attention_dropout", 0.1), "attention_dropout"),
    "qwen2-quantized": ("qwen2", _set("quantization_config", {"quant_method": "bitsandbytes"}),
                        "quantization_config"),
    "qwen2-partial-rotary": ("qwen2", _set("rope_parameters", {"rope_type": "default", "rope_theta": 1e4,
                                                               "partial_rotary_factor": 0.5}), "rope_parameters"),
    # Qwen2.5-VL: text_config (nested) and the legacy flat form, then the vision tower.
    "qwen2_5_vl-linear": ("qwen2_5_vl", _set("text_config", "rope_parameters", _rope(rope_type="linear", factor=2.0)),
                          "rope_parameters"),
    "qwen2_5_vl-yarn": ("qwen2_5_vl", _set("text_config", "rope_parameters",
                                           _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
                        "rope_parameters"),
    "qwen2_5_vl-dynamic": ("qwen2_5_vl", _set("text_config", "rope_parameters", _rope(rope_type="dynamic", factor=2.0)),
                           "rope_parameters"),
    "qwen2_5_vl-legacy-flat-yarn": ("qwen2_5_vl", _flat(_set("rope_scaling", {"type": "yarn", "factor": 4.0,
                                                                        "mrope_section": [2, 2, 2]})), "rope_scaling"),
    "qwen2_5_vl-sliding": ("qwen2_5_vl", _set("text_config", "use_sliding_window", True), "use_sliding_window"),
    "qwen2_5_vl-legacy-flat-sliding": ("qwen2_5_vl", _flat(_set("use_sliding_window", True)), "use_sliding_window"),
    "qwen2_5_vl-activation": ("qwen2_5_vl", _set("text_config", "hidden_act", "relu"), "hidden_act"),
    "qwen2_5_vl-dropout": ("qwen2_5_vl", _set("text_config", "attention_dropout", 0.1), "attention_dropout"),
    "qwen2_5_vl-interleaved": ("qwen2_5_vl", _set("text_config", "rope_parameters",
                                                  _rope(rope_type="default", mrope_interleaved=True)),
                               "rope_parameters"),
    "qwen2_5_vl-quantized": ("qwen2_5_vl", _set("quantization_config", {"quant_method": "awq"}),
                             "quantization_config"),
    "qwen2_5_vl-vision-activation": ("qwen2_5_vl", _set("vision_config", "hidden_act", "relu"), "hidden_act"),
    "qwen2_5_vl-vision-rope": ("qwen2_5_vl", _set("vision_config", "rope_parameters",
                                                  {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
                               "rope_parameters"),
    "qwen2_5_vl-vision-dropout": ("qwen2_5_vl", _set("vision_config", "attention_dropout", 0.1), "attention_dropout"),
    # Gemma 3: text_config, SigLIP, top level.
    "gemma3-yarn": ("gemma3", _set("text_config", "rope_parameters", "full_attention",
                                   {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}), "rope_type"),
    "gemma3-dynamic-local": ("gemma3", _set("text_config", "rope_parameters", "sliding_attention",
                                            {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    "gemma3-activation": ("gemma3", _set("text_config", "hidden_activation", "relu"), "hidden_activation"),
    "gemma3-dropout": ("gemma3", _set("text_config", "attention_dropout", 0.1), "attention_dropout"),
    "gemma3-bidirectional": ("gemma3", _set("text_config", "use_bidirectional_attention", True),
                             "use_bidirectional_attention"),
    "gemma3-quantized": ("gemma3", _set("quantization_config", {"quant_method": "gptq"}), "quantization_config"),
    "gemma3-vision-activation": ("gemma3", _set("vision_config", "hidden_act", "relu"), "hidden_act"),
    "gemma3-vision-dropout": ("gemma3", _set("vision_config", "attention_dropout", 0.1), "attention_dropout"),
    "gemma3-vision-head": ("gemma3", _set("vision_config", "vision_use_head", True), "vision_use_head"),
}


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl", "qwen2_5_vl-flat", "gemma3"])
def test_control_converts(sources, family, tmp_path):
  """Without an edit every source converts, so each refusal below is the edit's doing."""
  src = sources[family.split("-")[0]]
  if family.endswith("-flat"):
    src = _edited(src, str(tmp_path / "src"), _flat(lambda cfg: None))
  rc, err = _convert(src, str(tmp_path / "ck"))
  assert rc == 0, err
  assert os.path.exists(tmp_path / "ck" / "jaxdpo_model.json")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_field_writes_nothing(sources, case, tmp_path):
  family, edit, field = REFUSED[case]
  src = _edited(sources[family], str(tmp_path / "src"), edit)
  rc, err = _convert(src, str(tmp_path / "out" / "ck"))
  assert rc == 2, err
  assert field in err, err
  assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")  # not even a temp dir


def test_refusal_through_python_m(sources, tmp_path):
  """The documented command itself: `python -m jaxdpo.convert hf-to-jax` on a YaRN Qwen2.5-VL."""
  family, edit, field = REFUSED["qwen2_5_vl-yarn"]
  src = _edited(sources[family], str(tmp_path / "src"), edit)
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "jaxdpo.convert", "hf-to-jax", "--hf-dir", src, "--out", str(out / "ck"),
                         "--no-tokenizer"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  assert "text fields: rope_parameters=" in proc.stderr and "'yarn' is not implemented" in proc.stderr, proc.stderr
  assert not out.exists()


def test_unknown_field_is_named_in_a_warning(sources, tmp_path, caplog):
  src = _edited(sources["qwen2"], str(tmp_path / "src"), _set("my_new_attention_trick", 3))
  with caplog.at_level("WARNING", logger="jaxdpo.models.hf_fields"):
    rc, err = _convert(src, str(tmp_path / "ck"))
  assert rc == 0, err
  assert "my_new_attention_trick" in caplog.text
