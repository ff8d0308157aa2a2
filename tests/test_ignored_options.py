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
