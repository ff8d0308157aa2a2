"""LoRA adapters written as a PEFT adapter (issue 13): `adapter_model.safetensors` + `adapter_config.json`.

`peft.PeftModel.from_pretrained(hf_base, out_dir)` loads the result onto the HF base model. The
module names come from the family's converter rules: the *canonical* HF key of each adapted kernel,
less ".weight". Canonical keys are transformers-5's runtime module names (`model.language_model.layers...`
for Qwen2.5-VL and Gemma 3), which is what peft matches `target_modules` against; the hub layout that
`jax-to-hf` writes for Qwen2.5-VL (`model.layers...`, renamed by transformers at load) would match nothing.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx

from jaxdpo.errors import ConversionError
from jaxdpo.models import convert_table, layers


def adapter_tensors(graphdef, params, family, model_cfg) -> tuple[dict[str, np.ndarray], list[str], float, int]:
  """(PEFT tensors by key, adapted HF module names, lora_alpha, rank) of a LoRA parameter tree.

  PEFT's `lora_A.weight` is [r, fan_in] and `lora_B.weight` [fan_out, r], with the HF kernel's
  flattening of the input and output dims (the converter's row-major reshape).
  """
  model = nnx.merge(graphdef, params)
  rules = family.rules(model_cfg)
  tensors, modules, alphas, ranks = {}, [], set(), set()
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, layers.Einsum) or node.lora_a is None:
      continue
    kernel_path = ".".join(str(p) for p in path) + ".kernel"
    hf_key = convert_table.hf_key_of(kernel_path, rules)  # canonical = runtime name (no denormalize_key)
    if not hf_key.endswith(".weight"):
      raise ConversionError(f"LoRA export: {kernel_path} maps to {hf_key!r}, not a linear layer's weight")
    module = hf_key[:-len(".weight")]
    a = np.asarray(jax.device_get(node.lora_a[...]), np.float32)
    b = np.asarray(jax.device_get(node.lora_b[...]), np.float32)
    r = b.shape[0]
    tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    modules.append(module)
    ranks.add(r)
    alphas.add(node.lora_scale * r)
  if not modules:
    raise ConversionError("LoRA export: the parameters hold no adapter (lora.rank was 0?)")
  if len(ranks) != 1 or len(alphas) != 1:
    raise ConversionError(f"LoRA export: one rank and alpha expected, got ranks {sorted(ranks)}, "
                          f"alphas {sorted(alphas)}")
  return tensors, modules, alphas.pop(), ranks.pop()


def write_peft(out_dir: str, graphdef, params, family, model_cfg, *, base_model: str = "") -> str:
  """Writes `out_dir/adapter_model.safetensors` and `out_dir/adapter_config.json`; returns `out_dir`.

  Args:
    base_model: recorded as `base_model_name_or_path` (the HF dir or hub name of the base).
  """
  tensors, modules, alpha, rank = adapter_tensors(graphdef, params, family, model_cfg)
  os.makedirs(out_dir, exist_ok=True)
  convert_table.write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors, {"format": "pt"})
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
      "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
      # A regex (PEFT full-matches it against each module name): exactly the adapted modules.
      "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")",
      "base_model_name_or_path": base_model or None,
  }
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return out_dir

