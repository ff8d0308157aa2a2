"""The full-scale stage configs and `python -m jaxdpo.bench --stages` (issue 15, "Full scale").

The estimator is checked on tiny presets against numbers computed here independently: weights from
the parameter count, the generation cache from its layout, the DPO memory from the planner on a
real (fake-device) mesh, and the time model's scaling. The shipped configs are checked for what
the pipeline needs of them (mined pairs fit the DPO stage; each loads from the root and the package).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

import jax
import pytest

from jaxdpo.cli import bench_stages as S
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup
from jaxdpo.models import registry
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd
from tests._dpo_helpers import ROOT


def _root_config(name, arg=None):
  spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("name", S.FAMILIES)
def test_stage_configs_load_and_mined_pairs_fit_the_dpo_stage(name):
  ev, mine, dpo = (_root_config(f"{name}_{j}", "/ckpt/m") for j in ("eval", "mine", "dpo"))
  for job, c in (("eval", ev), ("mine", mine)):
    packaged = importlib.import_module(f"jaxdpo.configs.{name}_{job}").get_config("/ckpt/m")
    assert c.to_dict() == packaged.to_dict()
    assert c.job == job and c.model.checkpoint == "/ckpt/m" and c.data.tokenizer == "/ckpt/m/tokenizer"
    assert (c.model.family, c.model.preset) == (dpo.model.family, dpo.model.preset)
    # A rejected loop runs to the limit: prompt + max_new_tokens is the longest pair the DPO stage sees.
    assert c.generate.max_prompt_length + c.generate.max_new_tokens <= dpo.data.max_length
    assert c.generate.max_prompt_length <= dpo.data.max_prompt_length
  assert ev.generate.temperature == 0.0 and not ev.generate.stop_on_loop  # the study's definition
  assert mine.mine.rejected == "degenerate" and mine.generate.stop_on_loop and mine.mine.temperature > 0
  with pytest.raises(ValueError, match="job must be"):
    from jaxdpo.configs import _full_size
    _full_size.full_size_generation("qwen2_5_vl", "qwen2_5_vl_3b", None, "dpo")


def _tiny_generation(job):
  c = config_defaults.base()
  c.job = job
  c.model.update(family="qwen2_5_vl", preset="tiny_vl", param_dtype="bfloat16", compute_dtype="bfloat16")
  c.generate.update(max_prompt_length=40, max_new_tokens=24, batch_size=8)
  return c


def test_generation_memory_is_weights_cache_and_prefill():
  c = _tiny_generation("eval")
  cfg = registry.get_family("qwen2_5_vl").presets["tiny_vl"]()
  t = cfg.text
  acc = S.Accelerator("four chips", 4, 100.0, 1000.0, 16.0)
  est = S.generation_estimate("tiny", acc, S.Assumptions(), "eval", config=c)
  _, model = S._abstract_model("qwen2_5_vl", "tiny_vl", "bfloat16")
  n_all, n_vision, n_embed = S._param_counts(model)
  assert n_vision > 0 and n_embed == t.vocab_size * t.hidden_size
  head = t.head_dim or t.hidden_size // t.num_heads
  rows = 8 // 4
  # Qwen's cache: K and V per layer, [rows, context, kv heads, head dim] in bf16; int32 segment ids
  # [rows, context], the next write index [rows] and the next M-RoPE positions [3, rows].
  kv = 2 * t.num_layers * rows * (40 + 24) * t.num_kv_heads * head * 2 + rows * (40 + 24) * 4 + rows * 4 + 3 * rows * 4
  prefill = rows * 40 * (4 * t.hidden_size + 3 * t.intermediate_size) * 2 + rows * t.vocab_size * 4
  expected = n_all * 2 / 4 + kv + prefill
  assert est.memory_gb_per_device * 1e9 == pytest.approx(expected, rel=1e-9)
  assert est.memory_where == "device" and est.seconds > 0


def test_time_model_scales_with_the_workload_and_the_machine():
  c = _tiny_generation("eval")
  one = S.Accelerator("one", 1, 100.0, 1000.0, 16.0)
  a = S.Assumptions()
  base = S.generation_estimate("tiny", one, a, "eval", config=c).seconds
  twice = S.generation_estimate("tiny", one, dataclasses.replace(a, eval_pages=2 * a.eval_pages), "eval", config=c)
  assert twice.seconds == pytest.approx(2 * base, rel=1e-9)
  fast = S.generation_estimate("tiny", dataclasses.replace(one, hbm_gb_per_s=2000.0, bf16_tflops=200.0), a, "eval",
                               config=c).seconds
  assert fast == pytest.approx(base / 2, rel=1e-9)  # every term is bytes / bandwidth or FLOPs / peak
  # Mining samples k times with static batches: more samples cost proportionally more batches.
  m = _tiny_generation("mine")
  m.mine.num_samples = 4
  m1 = S.generation_estimate("tiny", one, dataclasses.replace(a, mine_samples=1, mine_pages=64), "mine", config=m)
  m4 = S.generation_estimate("tiny", one, dataclasses.replace(a, mine_samples=4, mine_pages=64), "mine", config=m)
  assert m4.seconds == pytest.approx(4 * m1.seconds, rel=1e-9)


def test_dpo_memory_is_the_planner_on_the_real_mesh():
  """The estimate's abstract mesh sizes the state exactly as the planner does on 8 real devices."""
  assert len(jax.devices()) == 8
  c = config_defaults.base()
  c.model.update(family="qwen2_5_vl", preset="tiny_vl", param_dtype="float32", compute_dtype="bfloat16")
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.train.update(batch_size=16, grad_accum=2, remat="full", scan_layers=True)
  acc = S.Accelerator("8 chips", 8, 100.0, 1000.0, 16.0)
  est = S.dpo_estimate("tiny", acc, S.Assumptions(), config=c)
  real = memory.plan_dpo(dpo_job.memory_run(c), shd.make_mesh(c.mesh), model_setup.parse_rules(c.sharding_rules))
  assert est.memory_gb_per_device * 1e9 == pytest.approx(real.total, rel=1e-12)
  assert real.fsdp == 8
  # Twice the pairs, twice the time; the reference forward is one of the step's four passes.
  a = S.Assumptions()
  more = S.dpo_estimate("tiny", acc, dataclasses.replace(a, dpo_pairs=2 * a.dpo_pairs), config=c)
  assert more.seconds == pytest.approx(2 * est.seconds, rel=1e-9)


def test_table_has_every_stage_of_every_model():
  rows = []
  for fam in ("a", "b"):
    for acc in S.ACCELERATORS:
      rows += [S.StageEstimate(fam, acc.name, st, 1.0, "device", 60.0, "w") for st in S.STAGES]
  text = S.table(rows)
  assert text.count("\n") == 1 + 2 * len(S.STAGES)
  assert "| a | mine | 1.0 GB (device) | 1.0 min |" in text


def test_readme_commands_name_shipped_configs_and_real_keys():
  """Every `python -m jaxdpo.main --config configs/X.py[:arg] ... --config.a.b=v` in the README names a
  config that loads and keys that it has (a typo in the guide would otherwise only show on a GPU)."""
  import re
  import shlex
  text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
  commands = [m.group(0) for m in re.finditer(r"python -m jaxdpo\.main [^\n`]*", text)]
  assert len(commands) >= 5
  checked = 0
  for cmd in commands:
    words = shlex.split(cmd)
    if "--config" not in words or "NAME" in cmd:
      continue
    spec = words[words.index("--config") + 1]
    name, _, arg = spec.partition(".py:")
    name = name.removesuffix(".py")
    config = _root_config(os.path.basename(name), arg or None)
    for w in words:
      if w.startswith("--config."):
        key = w[len("--config."):].split("=", 1)[0]
        node = config
        for part in key.split("."):
          assert part in node, f"README: {cmd!r} sets {key}, which {name}.py does not have"
          node = node[part]
    checked += 1
  assert checked >= 5
