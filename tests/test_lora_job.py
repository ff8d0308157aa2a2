"""LoRA DPO through the job (issue 13): no reference copy, the loss falls, only adapters in the
optimizer, and the exported model is the base with the adapters merged into the targeted kernels."""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup
from jaxdpo.models import io, lora
from jaxdpo.models import trainable as trainable_lib
from jaxdpo.parallel import sharding as shd
from tests._dpo_helpers import demo_config, read_metrics


def _flat(tree):
  return {trainable_lib.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lora_dpo_job_trains_adapters_only_and_exports_merged(tmp_path):
  c = demo_config(**{"lora.rank": 4, "lora.alpha": 8.0, "train.num_steps": 6, "train.log_every": 1,
                     "optim.lr": 1e-2, "optim.warmup_steps": 0, "data.eval": "", "train.ckpt_every": 0})
  dpo_job.run(c, str(tmp_path))
  logged = [m for m in read_metrics(str(tmp_path)) if "loss" in m and "grad_norm" in m]
  assert logged[0]["rewards/margins"] == 0.0  # step 1: B = 0, the policy is the reference exactly
  assert logged[-1]["loss"] < logged[0]["loss"] - 1e-3, [m["loss"] for m in logged]

  # The initial base: the same preset init, without adapters.
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  base = _flat(model_setup.setup_model(c.model, mesh, shd.DEFAULT_RULES, seed=c.seed).params)
  _, _, _, exported = io.load_model(str(tmp_path / "model"))
  exported = _flat(nnx.to_pure_dict(exported))
  assert exported.keys() == base.keys()  # a plain model: no adapter leaves
  pattern = lora.LoraConfig(rank=4).targets
  changed = set()
  for path, w in base.items():
    module = path.rsplit("/", 1)[0]
    if path.endswith("/kernel") and re.search(pattern, module):
      delta = np.abs(exported[path] - w).max()
      assert delta > 1e-6 * np.abs(w).max(), path  # every B trained from step 1, so every kernel moved
      changed.add(path)
    else:
      np.testing.assert_array_equal(exported[path], w, err_msg=path)  # untargeted: bit-identical
  assert len(changed) == 7 * model_setup.resolve_model(c.model)[1].num_layers

  # workdir/peft loads with peft onto the HF export of the initial base and gives the merged model's logits.
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM
  family, cfg = model_setup.resolve_model(c.model)
  base_tree = model_setup.setup_model(c.model, mesh, shd.DEFAULT_RULES, seed=c.seed).params
  io.export_model_dir(str(tmp_path / "base"), family, cfg, jax.device_get(base_tree),
                      hf_config=family.config_to_hf(cfg))
  io.jax_to_hf_dir(str(tmp_path / "base"), str(tmp_path / "base-hf"))
  io.jax_to_hf_dir(str(tmp_path / "model"), str(tmp_path / "merged-hf"))
  ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  with torch.no_grad():
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged-hf")).eval()(input_ids=ids).logits.numpy()
    hf_base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base-hf")).eval()
    base_logits = hf_base(input_ids=ids).logits.numpy()
    peft = PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()(input_ids=ids).logits.numpy()
  err = float(np.abs(peft - merged).max() / np.abs(merged).max())
  print(f"job export: PEFT on the base vs merged model, logits max rel err {err:.2e}")
  assert err < 1e-5
  assert float(np.abs(base_logits - merged).max() / np.abs(merged).max()) > 1e-4  # the adapters did train
