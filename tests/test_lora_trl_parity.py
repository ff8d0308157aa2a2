"""Issue 13 acceptance 2: LoRA DPO held to TRL's DPOTrainer with a peft LoraConfig.

Same tiny Qwen2, same batch, same adapters (PEFT's random A copied into jaxdpo's, B = 0 in both),
rank 4, alpha 8, dropout 0, the default targets (q, k, v, o, gate, up, down). TRL's reference is
the PEFT model with its adapter disabled; jaxdpo's is the policy with B = 0 (`models.lora.disabled`),
with no reference tree passed. Three train steps: the third one's loss, metrics and pre-clipping
grad_norm come after 2 AdamW updates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.models import io, lora
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.train import update
from tests._dpo_helpers import tiny_qwen2_hf, tokenizer
from tests.test_trl_parity import METRICS, PAIRS, _our_batch

RANK, ALPHA, STEPS = 4, 8.0, 3
HF_TO_OURS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}


def _trl_trainer(tmp_path, hf):
  from datasets import Dataset
  from peft import LoraConfig
  from trl import DPOConfig, DPOTrainer
  args = DPOConfig(output_dir=str(tmp_path / "trl-lora"), per_device_train_batch_size=len(PAIRS), learning_rate=1e-3,
                   lr_scheduler_type="constant", warmup_steps=0, max_steps=STEPS, beta=0.1, loss_type=["sigmoid"],
                   bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                   max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                   dataset_num_proc=None, gradient_checkpointing=False, max_length=None)
  peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=list(HF_TO_OURS))
  return DPOTrainer(model=hf, ref_model=None, args=args, train_dataset=Dataset.from_list(PAIRS),
                    processing_class=tokenizer(), peft_config=peft_cfg)


def _adapters_from_peft(peft_model, params):
  """jaxdpo's params with every lora_a / lora_b replaced by the PEFT model's (transposed, reshaped)."""
  out = jax.tree.map(np.asarray, params)
  seen = 0
  for name, w in peft_model.named_parameters():
    if ".lora_" not in name:
      continue
    parts = name.split(".")  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    i = parts.index("layers")
    layer, block, proj, which = int(parts[i + 1]), parts[i + 2], parts[i + 3], parts[i + 4]
    node = out["layers"][layer][block][HF_TO_OURS[proj]]
    key = {"lora_A": "lora_a", "lora_B": "lora_b"}[which]
    node[key] = w.detach().numpy().T.reshape(node[key].shape).astype(np.float32)
    seen += 1
  assert seen == 2 * 7 * len(out["layers"])
  return out


def _our_trajectory(graphdef, params, batch):
  from ml_collections import ConfigDict
  from jaxdpo.parallel import sharding as shd
  from jaxdpo.train import optim
  ocfg = ConfigDict(dict(lr=1e-3, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999,
                         eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
  tx, _ = optim.make_optimizer(ocfg, STEPS)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  params = jax.device_put(params, shd.replicated(mesh))
  mask = lora.adapter_mask(params)
  from jaxdpo.models import trainable as trainable_lib
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(trainable_lib.trainable_part(params, mask))}
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(loss_type="sigmoid", beta=0.1), logprob_chunk=5,
                            lora_reference=True)
  step = update.make_train_step(step_lib.objective(graphdef, cfg), tx, mesh,
                                jax.tree.map(lambda _: shd.replicated(mesh), state), None, trainable_mask=mask)
  out = []
  for _ in range(STEPS):
    state, metrics = step(state, None, shd.put_batch(batch, mesh))
    out.append({k: float(v) for k, v in metrics.items()})
  return out, state


def test_lora_dpo_matches_trl_peft_over_two_adamw_steps(tmp_path):
  tok = tokenizer()
  hf, ckpt = tiny_qwen2_hf(str(tmp_path), tied=False, vocab=len(tok) + 7, seed=3)
  graphdef, params = io.load_model(ckpt)[2:]
  model = nnx.merge(graphdef, params)
  lora.add_adapters(model, lora.LoraConfig(rank=RANK, alpha=ALPHA), nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  trainer = _trl_trainer(tmp_path, hf)
  params = _adapters_from_peft(trainer.model, nnx.to_pure_dict(state))
  base_before = lora.split_base(params)[0]
  batch = _our_batch(trainer)
  trainer.train()
  theirs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
  assert len(theirs) == STEPS
  ours, final = _our_trajectory(graphdef, params, batch)
  worst = 0.0
  for i, (o, t) in enumerate(zip(ours, theirs)):
    reward_scale = max(abs(t[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    for k in ("loss", "grad_norm") + METRICS:
      scale = reward_scale if k in ("rewards/chosen", "rewards/rejected", "rewards/margins") else abs(t[k])
      err = abs(o[k] - t[k]) / max(scale, 1e-6)
      worst = max(worst, err)
      assert err <= 1e-4, (f"step {i + 1}", k, o[k], t[k])
  print(f"LoRA DPO vs TRL+peft: worst relative difference {worst:.2e}")
  assert theirs[0]["rewards/margins"] == 0.0 and abs(theirs[2]["rewards/margins"]) > 1e-4  # B = 0, then it trains
  # The base never moves; the adapters do.
  base_after, adapters_after = lora.split_base(jax.device_get(final["params"]))
  jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(
      jax.tree_util.tree_map_with_path(lambda p, x: x if "lora_b" in str(p) else np.zeros(()), adapters_after))) > 0
