"""Qwen2.5-VL converters: exact round trips in both key layouts, loading by transformers, errors."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import _qwen_vl_helpers as H
from jaxdpo.cli import convert as cli
from jaxdpo.models import convert_table, io, registry
from jaxdpo.models.qwen2_5_vl import convert as qconv


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp("qvl_conv")
  out = {}
  for tie in (True, False):
    path = str(d / f"hf_tie{int(tie)}")
    H.build_hf_model(path, tie=tie, seed=int(tie))
    H.tiny_processor().save_pretrained(path)  # preprocessor_config.json travels with the model
    _tiny_tokenizer().save_pretrained(path)
    out[tie] = path
  return d, out


def _tiny_tokenizer():
  """A word-level tokenizer that hf-to-jax's check accepts: an eos and the model's vision tokens."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"<pad>": 0, "hello": 1, "world": 2, "<unk>": 3, "<eos>": 4, "<|image_pad|>": H.IMAGE,
           "<|video_pad|>": H.VIDEO, "<|vision_start|>": H.VSTART, "<|vision_end|>": H.VEND}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _siblings(path):
  parent, name = os.path.split(str(path))
  return [n for n in os.listdir(parent) if n.startswith(name)]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_round_trip_is_bit_exact(hf_dirs, tie, layout):
  d, dirs = hf_dirs
  src = dirs[tie]
  orig = H.read_safetensors(src)
  assert ("lm_head.weight" in orig) == (not tie)
  assert any(k.startswith("visual.blocks.") for k in orig) and any(k.startswith("model.layers.") for k in orig)
  if layout == "transformers5":
    renamed = H.write_layout(src, str(d / f"new_{tie}"), H.to_new_layout)
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    assert any(k.startswith("model.visual.blocks.") for k in renamed)
    src = str(d / f"new_{tie}")
  ckpt, back_dir = str(d / f"ck_{tie}_{layout}"), str(d / f"back_{tie}_{layout}")
  assert cli.main(["hf-to-jax", "--hf-dir", src, "--out", ckpt]) == 0
  assert cli.main(["jax-to-hf", "--ckpt", ckpt, "--out", back_dir, "--max-shard-gb", "0.0001"]) == 0
  files = os.listdir(back_dir)
  assert {"config.json", "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json",
          "tokenizer_config.json"} <= set(files)
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 1
  with open(os.path.join(back_dir, "model.safetensors.index.json")) as f:
    assert set(json.load(f)["weight_map"].values()) == set(shards)
  back = H.read_safetensors(back_dir)
  assert sorted(back) == sorted(orig)  # written in the hub layout, whatever came in
  for key, value in orig.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    assert np.array_equal(back[key], value), key
  if layout == "hub":  # the sharded export converts back, shard by shard, to the same parameters
    _, _, _, again = io.load_hf_model(back_dir)
    _, _, _, first = io.load_model(ckpt)
    flat_again, flat_first = io.flatten(again.to_pure_dict()), io.flatten(first.to_pure_dict())
    assert sorted(flat_again) == sorted(flat_first)
    assert all(np.array_equal(flat_again[k], flat_first[k]) for k in flat_first)


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_the_export_without_key_warnings(hf_dirs, tie):
  from transformers import AutoModelForImageTextToText
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  d, dirs = hf_dirs
  ckpt, back_dir = str(d / f"load_ck_{tie}"), str(d / f"load_back_{tie}")
  io.hf_to_jax_dir(dirs[tie], ckpt)
  io.jax_to_hf_dir(ckpt, back_dir)
  model, info = AutoModelForImageTextToText.from_pretrained(back_dir, output_loading_info=True)
  assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
  assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
  assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tie
  original = H.read_safetensors(dirs[tie])
  state = model.state_dict()
  assert np.array_equal(state["model.visual.merger.mlp.2.weight"].numpy(), original["visual.merger.mlp.2.weight"])
  assert Qwen2VLImageProcessorPil.from_pretrained(back_dir).patch_size == 4
  from transformers import AutoTokenizer
  assert AutoTokenizer.from_pretrained(back_dir)("hello world")["input_ids"] == [1, 2]


def test_load_hf_model_places_into_shardings(hf_dirs):
  _, dirs = hf_dirs
  device = jax.devices()[0]
  family = registry.get_family("qwen2_5_vl")
  cfg = qconv.vl_config_from_hf(json.load(open(os.path.join(dirs[True], "config.json"))))
  _, abstract = io.build_abstract(family, cfg)
  sharding = jax.sharding.SingleDeviceSharding(device)
  shardings = jax.tree.map(lambda _: sharding, abstract.to_pure_dict())
  fam, cfg2, graphdef, params = io.load_hf_model(dirs[True], shardings=shardings)
  assert fam.name == "qwen2_5_vl" and cfg2 == cfg
  leaves = jax.tree.leaves(params)
  assert all(leaf.sharding == sharding for leaf in leaves)
  model = nnx.merge(graphdef, params)
  orig = H.read_safetensors(dirs[True])
  np.testing.assert_array_equal(np.asarray(model.visual.blocks[2].attn.proj.bias[...]),
                                orig["visual.blocks.2.attn.proj.bias"])


def test_flat_legacy_and_nested_configs_agree(hf_dirs):
  _, dirs = hf_dirs
  with open(os.path.join(dirs[True], "config.json")) as f:
    nested = json.load(f)
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  flat.update({k: v for k, v in nested["text_config"].items() if k != "rope_parameters"})
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 2]}
  flat["rope_theta"] = 10000.0
  a, b = qconv.vl_config_from_hf(nested), qconv.vl_config_from_hf(flat)
  assert a == b
  assert a.text.mrope_section == (2, 2, 2) and a.text.tie_word_embeddings
  assert a.vision.fullatt_block_indexes == (1, 3) and a.vision.window_size == 16
  assert a.image_token_id == H.IMAGE
  # The tiny preset is this test model's shape.
  from jaxdpo.models.qwen2_5_vl import config as qcfg
  tiny = qcfg.tiny_vl()
  assert a == dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, eos_token_id=2, pad_token_id=H.PAD))


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error and no output directory (nor a leftover temporary one).


def _expect_failure(src, out, *patterns):
  with pytest.raises(convert_table.ConversionError) as e:
    io.hf_to_jax_dir(src, str(out))
  for p in patterns:
    assert p in str(e.value), str(e.value)
  assert _siblings(out) == []
  return str(e.value)


def test_other_architecture_is_refused(hf_dirs, tmp_path):
  _, dirs = hf_dirs
  src = tmp_path / "llama"
  shutil.copytree(dirs[True], src)
  cfg = json.load(open(src / "config.json"))
  cfg["architectures"] = ["LlamaForCausalLM"]
  json.dump(cfg, open(src / "config.json", "w"))
  _expect_failure(str(src), tmp_path / "out", "LlamaForCausalLM", "is not supported",
                  "Qwen2_5_VLForConditionalGeneration")
  assert cli.main(["hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "out")]) == 2


def test_text_only_checkpoint_lists_missing_vision_weights(hf_dirs, tmp_path):
  _, dirs = hf_dirs
  src = tmp_path / "text_only"
  H.write_layout(dirs[True], str(src), lambda k: k)
  from safetensors.numpy import save_file
  tensors = {k: v for k, v in H.read_safetensors(str(src)).items() if not k.startswith("visual.")}
  save_file(tensors, str(src / "model.safetensors"))
  msg = _expect_failure(str(src), tmp_path / "out", "missing model parameters (54)",
                        "visual.blocks.0.attn.qkv.kernel", "visual.merger.fc1.kernel", "... and 4 more")
  assert "unconsumed" not in msg


def test_truncated_safetensors_is_refused(hf_dirs, tmp_path):
  _, dirs = hf_dirs
  src = tmp_path / "trunc"
  shutil.copytree(dirs[True], src)
  path = src / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  _expect_failure(str(src), tmp_path / "out", "model.safetensors", "cannot read safetensors file")


def test_shape_mismatch_is_refused(hf_dirs, tmp_path):
  _, dirs = hf_dirs
  src = tmp_path / "shape"
  shutil.copytree(dirs[True], src)
  cfg = json.load(open(src / "config.json"))
  cfg["vision_config"]["intermediate_size"] = 50  # the weights have 52
  json.dump(cfg, open(src / "config.json", "w"))
  msg = _expect_failure(str(src), tmp_path / "out", "shape mismatches (20)",
                        "visual.blocks.0.mlp.down_proj.weight: shape (36, 52) -> (52, 36), model expects (50, 36)",
                        "visual.blocks.0.mlp.gate_proj.weight: (52, 36) cannot map to")
  assert "missing model parameters (20)" in msg  # the mis-shaped parameters are not filled either


def test_unconsumed_keys_are_listed(hf_dirs, tmp_path):
  _, dirs = hf_dirs
  src = tmp_path / "extra"
  H.write_layout(dirs[True], str(src), lambda k: k.replace("visual.blocks.3.", "visual.blocks.9."))
  _expect_failure(str(src), tmp_path / "out", "unconsumed HF keys", "visual.blocks.9.attn.qkv.weight",
                  "visual.blocks.3.attn.qkv.kernel")


def test_failure_while_writing_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
  _, dirs = hf_dirs

  def boom(path, params):
    os.makedirs(path)
    open(os.path.join(path, "partial"), "w").close()
    raise OSError("disk full")
  from jaxdpo.models import param_store
  monkeypatch.setattr(param_store, "save_tree", boom)  # each converted part is written through it
  with pytest.raises(OSError, match="disk full"):
    io.hf_to_jax_dir(dirs[True], str(tmp_path / "out"))
  assert _siblings(tmp_path / "out") == []
