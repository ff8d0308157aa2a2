"""Options that used to be accepted and then ignored now work, or are refused naming the key."""

import importlib.util
import math
import os

import pytest

from jaxdpo import assets
from jaxdpo.errors import ConfigError
from jaxdpo.jobs import model_setup
from jaxdpo.jobs import sft as sft_job
from jaxdpo.parallel import sharding as shd
from tests._dpo_helpers import ROOT, read_metrics


def _sft_config(**overrides):
  spec = importlib.util.spec_from_file_location("tiny_sft", os.path.join(ROOT, "configs", "tiny_sft.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.progress = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = getattr(node, p)
    setattr(node, leaf, value)
  return c


def test_batch_placement_override_is_refused_naming_the_key():
  with pytest.raises(ConfigError, match=r"config\.sharding_rules: 'batch=data'"):
    model_setup.parse_rules("embed=fsdp,batch=data")
  with pytest.raises(ConfigError, match=r"config\.sharding_rules: 'batch='"):
    model_setup.parse_rules("batch=")
  # Spelling out the placement that is used stays allowed.
  assert dict(model_setup.parse_rules("batch=data+fsdp"))["batch"] == shd.BATCH_AXES


def test_sft_refuses_a_memory_budget_it_cannot_check(tmp_path):
  with pytest.raises(ConfigError, match=r"config\.train\.device_memory_gb=8\.0"):
    sft_job.run(_sft_config(**{"train.device_memory_gb": 8.0}), str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before anything was written


def test_sft_scores_held_out_data_and_degeneration(tmp_path):
  """data.eval / train.eval_every and data.degeneration_eval / train.degeneration_eval_every in SFT."""
  config = _sft_config(**{"train.num_steps": 2, "train.log_every": 1, "train.ckpt_every": 0, "train.batch_size": 8,
                          "data.eval": assets.path("tiny_sft.jsonl"), "train.eval_every": 1,
                          "train.eval_batches": 1, "data.degeneration_eval": assets.path("tiny_prompts.jsonl"),
                          "train.degeneration_eval_every": 2, "generate.max_new_tokens": 4,
                          "generate.batch_size": 8})
  last = sft_job.run(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [1, 2], rows
  assert all(math.isfinite(r["eval/loss"]) and r["eval/loss"] > 0 and r["eval/tokens"] > 0 for r in evals)
  # The policy moved between the two evals, so the held-out loss is recomputed, not cached.
  assert evals[0]["eval/loss"] != evals[1]["eval/loss"]
  assert 0.0 <= last["eval/degeneration_rate"] <= 1.0 and "eval/hit_limit_rate" in last


def test_remat_and_scan_layers_reach_the_step_and_bad_values_are_refused():
  """train.remat / train.scan_layers: the DPO and SFT steps and the memory planner run with them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxdpo.jobs import common
  from jaxdpo.jobs import dpo as dpo_job
  from jaxdpo.jobs import validate
  from jaxdpo.models import decoder, registry
  from jaxdpo.objectives import dpo_step
  from tests._dpo_helpers import demo_config

  config = demo_config(**{"train.remat": "save_qkv_proj", "train.scan_layers": True})
  validate.check(config)
  family = registry.get_family(config.model.family)
  scfg = dpo_job.step_config(config, family)
  assert scfg.blocks == decoder.BlockPlan(remat="save_qkv_proj", scan=True)
  assert common.compute_settings(config, family)["blocks"] == scfg.blocks  # the SFT step's settings too
  run = dpo_job.memory_run(config)
  assert (run.remat, run.scan_layers) == ("save_qkv_proj", True)
  # The traced step holds the scan and the checkpointed blocks.
  model = family.build(family.presets[config.model.preset](), nnx.Rngs(0), jnp.float32, "xla")
  graphdef, params = nnx.split(model, nnx.Param)
  t = 8
  batch = {k: jnp.ones((1, 2, t), jnp.int32) for k in dpo_step.PAIR_KEYS}
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: dpo_step.pair_logps(graphdef, p, batch, scfg)[0].sum()))(params))
  assert "scan[" in jaxpr and "SaveOnlyTheseNames" in jaxpr and "'q_proj'" in jaxpr
  plain = dpo_job.step_config(demo_config(), family)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: dpo_step.pair_logps(graphdef, p, batch, plain)[0].sum()))(params))
  assert "scan[" not in jaxpr and "SaveOnlyTheseNames" not in jaxpr  # the defaults: the plain loop
  with pytest.raises(ConfigError, match=r"config\.train\.remat='dots': expected one of 'none', 'full'.*'save_qkv_proj'"):
    validate.check(demo_config(**{"train.remat": "dots"}))


def test_dpo_job_honours_optim_mu_dtype(tmp_path, monkeypatch):
  """optim.mu_dtype=bfloat16 reaches the job's optimizer state (AdamW's mu in bf16, nu in fp32)."""
  import jax
  import jax.numpy as jnp
  from jaxdpo.jobs import dpo as dpo_job
  from tests._dpo_helpers import demo_config
  seen = {}
  real = dpo_job.train.init_state

  def recording(bundle, tx, mesh, mask):
    state = real(bundle, tx, mesh, mask)
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    seen["mu"] = {x.dtype for x in jax.tree.leaves(adam[0].mu)}
    seen["nu"] = {x.dtype for x in jax.tree.leaves(adam[0].nu)}
    return state
  monkeypatch.setattr(dpo_job.train, "init_state", recording)
  dpo_job.run(demo_config(**{"optim.mu_dtype": "bfloat16", "train.num_steps": 1, "train.ckpt_every": 0,
                             "train.log_every": 1}), str(tmp_path))
  assert seen == {"mu": {jnp.dtype("bfloat16")}, "nu": {jnp.dtype("float32")}}


def test_stacked_params_reaches_the_dpo_state_and_sft_refuses_on(tmp_path):
  """train.stacked_params: the DPO job holds its state stacked (tests/test_stacked_job.py runs it); SFT, which
  does not, refuses "on" naming the key rather than ignoring it."""
  with pytest.raises(ConfigError, match=r"config\.train\.stacked_params='on': the stacked train state is built for"):
    sft_job.run(_sft_config(**{"train.stacked_params": "on", "train.scan_layers": True}), str(tmp_path))
  from jaxdpo.jobs import common
  from jaxdpo.jobs import defaults
  assert defaults.base().train.stacked_params == "auto"
  assert common.params_stacked(_sft_config(**{"train.scan_layers": True}), _NoLora(), None)
  assert not common.params_stacked(_sft_config(**{"train.scan_layers": False}), _NoLora(), None)
  assert not common.params_stacked(_sft_config(**{"train.scan_layers": True}), _NoLora(), {"mask": True})


class _NoLora:
  lora = None
