"""The memory planner: exact per-device bytes for the full-size configs from shapes alone (8 fake
devices, nothing allocated), refusal with advice, and agreement with XLA's own accounting."""

import importlib.util
import logging
import math
import os

import jax
import numpy as np
import pytest
import dataclasses

from jaxdpo.parallel import memory
from jaxdpo.jobs import model_setup
from jaxdpo.train import optim
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import update
from jaxdpo.data import pipeline
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.models import registry
from tests._dpo_helpers import ROOT, demo_config, tokenizer

# Published parameter counts (the safetensors metadata of the HF checkpoints).
PUBLISHED = {"qwen2_5_vl_3b_dpo": 3_754_622_976, "gemma3_4b_dpo": 4_300_079_472}


def _config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _expected_param_bytes(config, num_devices):
  """Per-device fp32 parameter bytes, derived here from the rules in the config, not the planner.

  On a data=1, tensor=1, fsdp=N mesh only fsdp splits anything: the first dimension whose logical
  name maps to fsdp and whose size N divides is split N ways; every other leaf is whole.
  """
  from jaxdpo.jobs import model_setup
  fsdp_names = {name for name, axes in model_setup.parse_rules(config.sharding_rules)
                if axes == "fsdp" or (isinstance(axes, tuple) and axes == ("fsdp",))}
  assert {"embed", "vision_embed"} <= fsdp_names
  family = registry.get_family(config.model.family)
  # The same abstract model the planner used (cached: building a full-size one takes seconds); its
  # parameter count is checked against the published one below.
  abstract = memory._abstract_params(family.name, family.presets[config.model.preset](), np.dtype("float32"))
  total_count, per_device = 0, 0
  for v in jax.tree.leaves(abstract, is_leaf=lambda x: hasattr(x, "get_metadata")):
    shape = v.get_value().shape
    axes = v.get_metadata().get("logical_axes") or (None,) * len(shape)
    count = math.prod(shape)
    split = any(name in fsdp_names and dim % num_devices == 0 for name, dim in zip(axes, shape))
    total_count += count
    per_device += 4 * count // (num_devices if split else 1)
  return total_count, per_device


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b_dpo", "gemma3_4b_dpo"])
def test_full_size_plan_is_exact_and_allocates_nothing(name, caplog):
  config = _config(name)
  assert config.model.param_dtype == "float32" and config.model.compute_dtype == "bfloat16"
  mesh = shd.make_mesh(config.mesh)
  assert mesh.shape["fsdp"] == 8 == len(jax.devices())
  rules = model_setup.parse_rules(config.sharding_rules)
  live_before = jax.live_arrays()  # held, so no id below is reused by a new array
  known = {id(a) for a in live_before}
  with caplog.at_level(logging.INFO, logger="jaxdpo"):
    plan = memory.report_and_check(memory.plan_dpo(dpo_job.memory_run(config), mesh, rules), -1.0)
  assert [a.shape for a in jax.live_arrays() if id(a) not in known] == []  # shapes only: no device buffer was created
  assert plan.source == "eval_shape"

  count, expected = _expected_param_bytes(config, 8)
  assert count == PUBLISHED[name]
  assert plan.params == expected
  # Large leaves really are split: per-device bytes are within 1% of a perfect 8-way split.
  assert expected < 1.01 * 4 * count / 8
  # AdamW: mu and nu mirror the parameters; plus two int32 step counters (adam, schedule).
  assert plan.opt_state == 2 * expected + 2 * 4
  assert plan.gradients == expected
  assert plan.reference == expected // 2  # dpo.reference=model: a frozen copy, held in bf16 (the compute dtype)
  # optim.mu_dtype=bfloat16: AdamW's first moment in bf16, the second in fp32.
  config.optim.mu_dtype = "bfloat16"
  lean = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  assert lean.opt_state == expected // 2 + expected + 2 * 4
  assert plan.activations > 0
  printed = caplog.text
  assert "memory plan per device (eval_shape, 8 devices, fsdp=8)" in printed
  assert f"({plan.params} bytes)" in printed and f"({plan.opt_state} bytes)" in printed


def test_refuses_what_cannot_fit_and_says_what_helps():
  config = _config("qwen2_5_vl_3b_dpo")
  config.mesh.data, config.mesh.fsdp = 8, 1  # pure data parallelism: every device holds everything
  mesh = shd.make_mesh(config.mesh)
  plan = memory.plan_dpo(dpo_job.memory_run(config), mesh, model_setup.parse_rules(config.sharding_rules))
  assert plan.params == 4 * PUBLISHED["qwen2_5_vl_3b_dpo"]
  with pytest.raises(memory.MemoryPlanError) as e:
    memory.report_and_check(plan, 16.0)  # a v5e chip
  msg = str(e.value)
  assert "budget is 16.00 GiB" in msg
  assert "--config.mesh.fsdp=8" in msg and "--config.dpo.reference=cached" in msg and "grad_accum" in msg
  memory.check(plan, None)  # no budget known (CPU): no check
  memory.check(plan, plan.total)  # exactly at the budget fits


def test_device_limit_sources():
  assert memory.device_limit(-1) is None
  assert memory.device_limit(16) == 16 * 2**30
  assert memory.device_limit(0) is None  # CPU devices report no bytes_limit


def test_compiled_plan_matches_xla_argument_accounting():
  """XLA's own argument bytes == the planner's params + optimizer + reference + batch + step counter."""
  config = demo_config(**{"train.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4, "model.preset": "tiny"})
  mesh = shd.make_mesh(config.mesh)
  rules = shd.DEFAULT_RULES
  plan = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  bundle = model_setup.setup_model(config.model, mesh, rules, seed=0)
  ref = jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p), out_shardings=bundle.param_shardings)(bundle.params)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  state = train.init_state(bundle, tx, mesh)
  assert memory.per_device_bytes(state["params"]) == plan.params  # abstract bytes == real shard bytes
  assert memory.per_device_bytes(state["opt_state"]) == plan.opt_state
  scfg = dpo_job.step_config(config, bundle.family)
  step_fn = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh,
                                   jax.tree.map(lambda x: x.sharding, state), bundle.param_shardings, schedule, grad_accum=scfg.grad_accum)
  tok = tokenizer()
  examples = dpo_job.tokenize_preferences(config.data.train, tok, config, desc="t")[:1]
  sample = pipeline.collate_pairs(examples, max_length=config.data.max_length, pad_id=tok.pad_token_id)
  compiled = step_fn.lower(state, ref, memory.abstract_batch(sample, 8, mesh)).compile()
  refined = memory.refine_with_compiled(plan, compiled)
  assert refined.source == "compiled"
  batch_bytes = 4 * 4 * (8 // 8) * 2 * config.data.max_length  # 4 int32 [B, 2, T] arrays, B split 8 ways
  args = compiled.memory_analysis().argument_size_in_bytes
  assert args == plan.params + plan.opt_state + plan.reference + batch_bytes + 4
  assert refined.batch == batch_bytes + 4 and refined.activations > 0 and refined.gradients == 0


def test_job_refuses_a_run_that_cannot_fit(tmp_path):
  """The DPO job stops with the plan and advice before the model is built (exit code 2)."""
  from tests._dpo_helpers import run_main
  r = run_main(tmp_path / "w", "--config.train.device_memory_gb=0.0001", "--config.train.num_steps=2")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "error: the run needs ~" in r.stderr and "budget is 0.00 GiB" in r.stderr
  assert "--config.mesh.fsdp=8" in r.stderr and "--config.dpo.reference=cached" in r.stderr
  assert "memory plan per device (eval_shape, 8 devices, fsdp=1)" in r.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_planner_counts_each_remat_policy_and_the_scan_copy():
  """train.remat: what each policy keeps per layer, ordered as `saved_residuals` orders them
  (tests/test_remat_scan.py); train.scan_layers adds one stacked compute-dtype copy of the layers."""
  from jaxdpo.models import remat
  config = _config("qwen2_5_vl_3b_dpo")
  mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  base = dpo_job.memory_run(config)
  plans = {name: memory.plan_dpo(dataclasses.replace(base, remat=name, scan_layers=False), mesh) for name in remat.POLICIES}
  order = ("none", "dots_saveable", "dots_no_batch", "save_attn", "save_qkv_proj", "full")
  acts = [plans[n].activations for n in order]
  assert acts == sorted(acts, reverse=True) and len(set(acts)) == len(acts), acts
  # Full remat: one [T, D] block input per layer and token, plus one layer's full set during its backward.
  cfg = base.model_cfg.text
  rows = 2 * config.train.batch_size // 8 // config.train.grad_accum
  tokens = rows * config.data.max_length
  logits = rows * config.train.logprob_chunk * cfg.vocab_size * 4
  one_layer = plans["none"].activations - logits
  assert one_layer % cfg.num_layers == 0
  assert plans["full"].activations == tokens * 2 * cfg.hidden_size * cfg.num_layers + one_layer // cfg.num_layers + logits
  scanned = memory.plan_dpo(dataclasses.replace(base, remat="full", scan_layers=True), mesh)
  # By hand: kernels split 8 ways on their embed dim (fsdp), biases and norms whole; bf16; the
  # vision tower (not scanned) is not counted.
  d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.intermediate_size
  kernels, small = 2 * d * n * h + 2 * d * k * h + 3 * d * f, n * h + 2 * k * h + 2 * d
  layers_bf16 = cfg.num_layers * (kernels // 8 + small) * 2
  assert scanned.activations - plans["full"].activations == layers_bf16
  assert "--config.train.remat=full" in " ".join(memory.advice(plans["none"]))
  assert not any("train.remat" in tip for tip in memory.advice(plans["full"]))
