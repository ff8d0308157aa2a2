"""Issue 13: the PEFT export of a LoRA VLM (Qwen2.5-VL, Gemma 3) loads with `peft` onto the exported HF base
and gives the logits of the merged export loaded with `from_pretrained`. The adapter's module names must be
transformers' runtime names (`model.language_model.layers...`), else peft adapts nothing."""

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import _vision_job_helpers as VH
from jaxdpo.models import io, lora, lora_peft
from jaxdpo.models import trainable as trainable_lib
from tests._dpo_helpers import max_rel_err

HF_CLASS = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


def _hf(cls_name, path):
  import transformers
  return getattr(transformers, cls_name).from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_vlm_peft_export_matches_the_merged_model(tmp_path, family):
  from peft import PeftModel
  ck, _ = VH.build_checkpoint(family, str(tmp_path), seed=2)
  fam, cfg, graphdef, params = io.load_model(ck)
  model = nnx.merge(graphdef, params)
  adapted = lora.add_adapters(model, lora.LoraConfig(rank=4, alpha=8.0), nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  key = iter(jax.random.split(jax.random.key(3), 1000))
  params = jax.tree_util.tree_map_with_path(  # a trained-looking B (B = 0 would hide a naming or layout error)
      lambda p, x: 0.05 * jax.random.normal(next(key), x.shape) if trainable_lib.path_str(p).endswith("lora_b") else x,
      nnx.to_pure_dict(state))
  peft_dir = lora_peft.write_peft(str(tmp_path / "peft"), graphdef, params, fam, cfg)
  io.jax_to_hf_dir(ck, str(tmp_path / "base-hf"))
  io.export_model_dir(str(tmp_path / "merged"), fam, cfg, lora.merged(graphdef, params),
                      hf_config=io.source_hf_config(ck))
  io.jax_to_hf_dir(str(tmp_path / "merged"), str(tmp_path / "merged-hf"))

  peft_model = PeftModel.from_pretrained(_hf(HF_CLASS[family], str(tmp_path / "base-hf")), peft_dir).eval()
  n_loaded = sum(1 for n, _ in peft_model.named_parameters() if ".lora_A." in n)
  assert n_loaded == len(adapted)  # every adapter found its module (0 with the hub layout's names)
  merged = _hf(HF_CLASS[family], str(tmp_path / "merged-hf"))
  vocab = cfg.text.vocab_size
  ids = torch.tensor(np.random.default_rng(0).integers(1, min(vocab, 200), (2, 11)))  # text tokens only: the
  with torch.no_grad():  # adapters sit on the language model, which every token goes through
    got = peft_model(input_ids=ids).logits.numpy()
    with peft_model.disable_adapter():
      base = peft_model(input_ids=ids).logits.numpy()
    want = merged(input_ids=ids).logits.numpy()
  err = max_rel_err(got, want)
  print(f"{family}: PEFT vs merged logits max rel err {err:.2e}; the adapter moves them by {max_rel_err(base, want):.2e}")
  assert err < 1e-5
  assert max_rel_err(base, want) > 1e-3  # control: the adapters change the logits
