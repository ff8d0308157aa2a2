"""Issue 13 acceptance 3: jaxdpo's LoRA model written as a PEFT adapter, loaded with `peft` onto the HF
base, gives jaxdpo's logits; the merged model loads with `from_pretrained` and gives them too."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxdpo.models import io, lora, lora_peft
from jaxdpo.models import trainable as trainable_lib
from tests._dpo_helpers import max_rel_err, tiny_qwen2_hf


def _lora_model(ckpt):
  family, cfg, graphdef, params = io.load_model(ckpt)
  model = nnx.merge(graphdef, params)
  lora.add_adapters(model, lora.LoraConfig(rank=4, alpha=8.0), nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  key = iter(jax.random.split(jax.random.key(5), 1000))
  params = jax.tree_util.tree_map_with_path(  # a trained-looking B (B = 0 would hide any layout error)
      lambda p, x: 0.05 * jax.random.normal(next(key), x.shape) if trainable_lib.path_str(p).endswith("lora_b") else x,
      nnx.to_pure_dict(state))
  return family, cfg, graphdef, params


def _ours(graphdef, params, ids):
  model = nnx.merge(graphdef, params)
  b, t = ids.shape
  inputs = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}
  return np.asarray(model.logits(model.hidden_states(inputs)))


def test_peft_export_loads_onto_the_hf_base_with_the_same_logits(tmp_path):
  from peft import PeftModel
  hf, ckpt = tiny_qwen2_hf(str(tmp_path), tied=False, seed=4)
  family, cfg, graphdef, params = _lora_model(ckpt)
  out = lora_peft.write_peft(str(tmp_path / "peft"), graphdef, params, family, cfg, base_model="tiny")
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
  want = _ours(graphdef, params, ids)
  peft_model = PeftModel.from_pretrained(hf, out).eval()
  n_adapted = sum(1 for n, _ in peft_model.named_parameters() if ".lora_A." in n)
  assert n_adapted == 7 * cfg.num_layers
  with torch.no_grad():
    got = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    with peft_model.disable_adapter():
      base = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  err = max_rel_err(want, got)
  print(f"PEFT export: logits max rel err {err:.2e}; adapters move them by {max_rel_err(base, got):.2e}")
  assert err < 1e-5
  assert max_rel_err(base, got) > 1e-3  # control: the loaded adapter really changes the logits

  # The merged model: the base with A B alpha/r folded in, a plain checkpoint, through jax-to-hf.
  merged = lora.merged(graphdef, params)
  io.export_model_dir(str(tmp_path / "merged"), family, cfg, merged, hf_config=io.source_hf_config(ckpt))
  io.jax_to_hf_dir(str(tmp_path / "merged"), str(tmp_path / "merged-hf"))
  from transformers import AutoModelForCausalLM
  hf_merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged-hf")).eval()
  with torch.no_grad():
    got_merged = hf_merged(input_ids=torch.tensor(ids)).logits.numpy()
  err_m = max_rel_err(want, got_merged)
  print(f"merged export: logits max rel err {err_m:.2e}")
  assert err_m < 1e-5
