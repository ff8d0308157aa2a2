"""Vision DPO held to TRL 1.16's DPOTrainer: same weights, same 4 image pairs, same AdamW steps.

For each family (Qwen2.5-VL, Gemma 3): a tiny random HF checkpoint is the reference, a perturbed
copy the policy; both are converted with `io.hf_to_jax_dir`. TRL gets the HF policy and
reference, transformers' processor and a `datasets.Dataset` of conversational records with PIL
images; jaxdpo reads the same pairs as a JSONL file with image paths and tokenizes them with its
own adapter. The test first asserts both sides feed the models the same thing (prompt and
completion token ids per row, pixel values, image grids, Gemma's token_type_ids), then compares
`loss`, `grad_norm`, `rewards/*` and `logps/*` of three train steps (the first at the initial
weights, the third after 2 AdamW updates) within 1e-4 relative (fp32).

TRL handles Gemma 3's `token_type_ids`: its vision collator takes them from the processor
(prompt rows) and pads the completions with 0, and the trainer passes them to the model, which
uses them for the bidirectional attention over each image's tokens; so Gemma 3 gets the same
comparison as Qwen2.5-VL.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import _vision_job_helpers as VH
from jaxdpo.data import pipeline, tokenize
from jaxdpo.jobs import common
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.models import io
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib

FAMILIES = ["qwen2_5_vl", "gemma3"]
STEPS = 3  # logged steps: the first at the initial weights, the last after 2 AdamW updates
LR, BETA = 1e-3, 0.1
# Adam's epsilon, on both sides. With 1e-8 the first Adam step moves every weight by ~lr * sign(g), also
# those whose gradient is fp32 rounding noise (|g| ~ 1e-8 here, in the vision tower's MLPs), and TRL's and
# jaxdpo's noise differ in sign: after two steps single weights sat 1.7e-3 apart and the loss 1.7e-4 rel.
ADAM_EPS = 1e-6
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
# (image indices, chosen, rejected): 1, 2, 1 and 1 images; completions of different lengths.
PAIRS = [([0], "alpha bravo charlie", "alpha alpha alpha alpha alpha"),
         ([1, 2], "red green blue one", "red red"),
         ([3], "cat", "cat dog fish tree cat dog"),
         ([2], "one two three four five", "one one one")]


def _records(data_dir: str) -> tuple[str, list[dict]]:
  """The pairs as a jaxdpo JSONL file (image paths) and as TRL's conversational records (PIL images)."""
  imgs = VH.write_images(data_dir, 4)
  ours, theirs = [], []
  for idx, chosen, rejected in PAIRS:
    paths = [imgs[i] for i in idx]
    ours.append({"prompt": "transcribe :", "chosen": chosen, "rejected": rejected, "images": paths})
    theirs.append({"images": [Image.open(os.path.join(data_dir, p)).convert("RGB") for p in paths],
                   "prompt": [{"role": "user", "content": "transcribe :"}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]})
  return VH.write_jsonl(os.path.join(data_dir, "prefs.jsonl"), ours), theirs


def _perturbed_policy(family: str, hf, root: str):
  """A copy of `hf` moved by a seeded perturbation, saved with processor files and converted."""
  policy = copy.deepcopy(hf)
  gen = torch.Generator().manual_seed(11)
  with torch.no_grad():
    for p in policy.parameters():
      p.add_(0.02 * p.abs().max() * torch.randn(p.shape, generator=gen))
  hf_dir, ck_dir = os.path.join(root, "policy_hf"), os.path.join(root, "policy_ck")
  policy.save_pretrained(hf_dir)
  (VH.qwen_processor_files if family == "qwen2_5_vl" else VH.gemma_processor_files)(hf_dir)
  io.hf_to_jax_dir(hf_dir, ck_dir)
  return policy, ck_dir


def build(family: str, root: str) -> dict:
  """Checkpoints (reference, perturbed policy), the pairs on both sides, and jaxdpo's collated batch."""
  # Qwen2.5-VL's vision tower: one window-attention block and one full one (the default 4 compile ~2x longer).
  ref_ck, ref_hf = VH.build_checkpoint(family, root, seed=3 if family == "qwen2_5_vl" else 7,
                                       qwen_kw=dict(depth=2, fullatt=(1,)))
  policy_hf, policy_ck = _perturbed_policy(family, ref_hf, root)
  prefs, trl_rows = _records(os.path.join(root, "data"))

  config = config_defaults.base()
  config.model.checkpoint, config.data.tokenizer = policy_ck, os.path.join(policy_ck, "tokenizer")
  config.data.max_length, config.train.progress = 128, False
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  examples = dpo_job.tokenize_preferences(prefs, tok, config, desc="t", vision=vision)
  vision = vision.with_budget(examples)
  t = max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in examples) + 3  # extra padding on purpose
  batch = pipeline.collate_pairs(examples, max_length=t, pad_id=tok.pad_token_id, vision=vision)
  _, _, graphdef, pparams = io.load_model(policy_ck)
  _, _, _, rparams = io.load_model(ref_ck)
  return dict(family=family, root=root, ref_hf=ref_hf, policy_hf=policy_hf, trl_rows=trl_rows, tok=tok,
              tok_dir=config.data.tokenizer, examples=examples, vision=vision, batch=batch, graphdef=graphdef,
              pparams=pparams.to_pure_dict(), rparams=rparams.to_pure_dict(), policy_ck=policy_ck)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
  return build(request.param, str(tmp_path_factory.mktemp(request.param)))


def _trainer(setup, processor):
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer
  args = DPOConfig(output_dir=os.path.join(setup["root"], "trl"), per_device_train_batch_size=len(PAIRS),
                   learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_steps=STEPS, beta=BETA,
                   loss_type=["sigmoid"], bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=1,
                   save_strategy="no", seed=0, max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9,
                   adam_beta2=0.999, adam_epsilon=ADAM_EPS, dataset_num_proc=None, gradient_checkpointing=False,
                   max_length=None)
  return DPOTrainer(model=copy.deepcopy(setup["policy_hf"]), ref_model=copy.deepcopy(setup["ref_hf"]), args=args,
                    train_dataset=Dataset.from_list(setup["trl_rows"]), processing_class=processor)


def _assert_same_inputs(setup, trl_batch):
  """TRL's collated batch (chosen rows, then rejected rows; each prompt + completion, flushed left)
  holds the token ids, pixels and grids of jaxdpo's pairs."""
  ids, mask, comp = (trl_batch[k].numpy() for k in ("input_ids", "attention_mask", "completion_mask"))
  n = len(PAIRS)
  assert ids.shape[0] == 2 * n
  for r in range(2 * n):
    ex = setup["examples"][r % n]
    real = mask[r] == 1
    assert real[:real.sum()].all(), f"row {r}: TRL's row is not flushed left"
    prompt, completion = ids[r][real & (comp[r] == 0)].tolist(), ids[r][real & (comp[r] == 1)].tolist()
    assert prompt == ex.prompt, (r, prompt, ex.prompt)
    assert completion == (ex.chosen if r < n else ex.rejected), (r, completion)
  image_token = setup["vision"].image_token_id
  assert all(sum(i == image_token for i in e.prompt) > 0 for e in setup["examples"])
  ours = setup["batch"]
  pixels = trl_batch["pixel_values"].numpy()
  if setup["family"] == "qwen2_5_vl":
    grids = trl_batch["image_grid_thw"].numpy()
    counts = [len(e.images) for e in setup["examples"]]
    assert grids.shape[0] == 2 * sum(counts)
    our_grids = np.concatenate([ours["image_grid_thw"][i, :c] for i, c in enumerate(counts)])
    our_pixels = np.concatenate([ours["pixel_values"][i, :sum(e.image_units)] for i, e in enumerate(setup["examples"])])
    np.testing.assert_array_equal(grids[:len(our_grids)], our_grids)  # the chosen rows' images ...
    np.testing.assert_array_equal(grids[len(our_grids):], our_grids)  # ... repeated for the rejected rows
    half = pixels.shape[0] // 2
    np.testing.assert_array_equal(pixels[:half], our_pixels)
    np.testing.assert_array_equal(pixels[half:], our_pixels)
    np.testing.assert_array_equal(trl_batch["mm_token_type_ids"].numpy(), (ids == image_token) & (mask == 1))
  else:
    our_pixels = np.concatenate([ours["pixel_values"][i, :c] for i, c in enumerate(ours["num_images"])])
    half = pixels.shape[0] // 2
    np.testing.assert_array_equal(pixels[:half], our_pixels)
    np.testing.assert_array_equal(pixels[half:], our_pixels)
    # Gemma's token_type_ids reach the model: 1 exactly on the image tokens.
    np.testing.assert_array_equal(trl_batch["token_type_ids"].numpy(), (ids == image_token) & (mask == 1))


def _our_trajectory(setup):
  """jaxdpo's train step (AdamW, constant lr, clip 1.0) run STEPS times on the batch: each step's metrics."""
  from ml_collections import ConfigDict
  from jaxdpo.parallel import sharding as shd
  from jaxdpo.train import optim, update
  ocfg = ConfigDict(dict(lr=LR, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999,
                         eps=ADAM_EPS, weight_decay=0.0, max_grad_norm=1.0))
  tx, _ = optim.make_optimizer(ocfg, STEPS)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  rep = shd.replicated(mesh)
  params = jax.device_put(jax.tree.map(np.array, setup["pparams"]), rep)  # a copy: the state is donated
  ref = jax.device_put(setup["rparams"], rep)
  # Every leaf on the mesh, as the step returns it: otherwise the second call compiles again.
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}, rep)
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(loss_type="sigmoid", beta=BETA), logprob_chunk=16,
                            model_inputs=setup["vision"].family.model_inputs)
  step = update.make_train_step(step_lib.objective(setup["graphdef"], cfg), tx, mesh,
                                jax.tree.map(lambda _: rep, state), jax.tree.map(lambda _: rep, ref))
  out = []
  for _ in range(STEPS):
    state, metrics = step(state, ref, shd.put_batch(setup["batch"], mesh))
    out.append({k: float(v) for k, v in metrics.items()})
  return out, state["params"]


def test_vision_dpo_matches_trl_over_two_adamw_steps(setup, monkeypatch):
  processor = VH.hf_processor(setup["family"], setup["tok_dir"], monkeypatch)
  trainer = _trainer(setup, processor)
  _assert_same_inputs(setup, trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))]))
  trainer.train()
  theirs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
  assert len(theirs) == STEPS
  ours, _ = _our_trajectory(setup)
  worst = {}
  for i, (o, t) in enumerate(zip(ours, theirs)):
    # rewards/* are beta * differences of nearly equal log-probs: held relative to the step's reward scale.
    reward_scale = max(abs(t[k]) for k in REWARDS)
    for k in ("loss", "grad_norm") + METRICS:
      scale = max(reward_scale if k in REWARDS else abs(t[k]), 1e-6)
      err = abs(o[k] - t[k]) / scale
      worst[k] = max(worst.get(k, 0.0), err)
      assert err <= 1e-4, (setup["family"], f"step {i + 1}", k, o[k], t[k])
  print(f"{setup['family']} vs TRL, worst relative error over {STEPS} steps: "
        + json.dumps({k: f"{v:.1e}" for k, v in worst.items()}))
  print(f"{setup['family']} TRL step 1 / step {STEPS}: "
        + json.dumps({k: [round(theirs[0][k], 6), round(theirs[-1][k], 6)] for k in ("loss", "grad_norm") + METRICS}))
  # Not a degenerate comparison: policy != reference, and the updates moved the log-probs.
  assert abs(theirs[0]["rewards/margins"]) > 1e-3
  assert theirs[-1]["logps/chosen"] != pytest.approx(theirs[0]["logps/chosen"], rel=1e-4)
  assert theirs[-1]["loss"] < theirs[0]["loss"]
