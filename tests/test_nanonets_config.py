"""`configs/nanonets_ocr2_3b_dpo.py` (issue 12, acceptance 7): it loads (from the repository root and
as the packaged config), documents its defaults, and the memory planner accepts it on 8 fake
devices with the vision tower's optimizer state and gradients left out."""

from __future__ import annotations

import importlib
import importlib.util
import os

import jax

from jaxdpo.cli import config_paths
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd
from tests._dpo_helpers import ROOT

QWEN2_5_VL_3B_PARAMS = 3_754_622_976  # published count; Nanonets-OCR2-3B has the same shapes


def _root_config(arg=None):
  spec = importlib.util.spec_from_file_location("n", os.path.join(ROOT, "configs", "nanonets_ocr2_3b_dpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_loads_from_the_root_and_the_package_with_documented_defaults():
  root = _root_config()
  packaged = importlib.import_module("jaxdpo.configs.nanonets_ocr2_3b_dpo")
  assert root.to_dict() == packaged.get_config().to_dict()
  assert os.path.basename(config_paths.resolve("nanonets_ocr2_3b_dpo.py")) == "nanonets_ocr2_3b_dpo.py"
  assert (root.model.family, root.model.preset, root.model.trainable) == ("qwen2_5_vl", "nanonets_ocr2_3b", "language")
  assert (root.dpo.beta, root.optim.lr, root.dpo.reference) == (0.1, 1e-6, "model")
  for key in ("model.trainable", "dpo.beta", "optim.lr", "dpo.reference", "train.grad_accum"):
    assert f"`{key}=" in packaged.__doc__, key  # each default is explained
  with_ckpt = _root_config("/ckpt/nanonets")
  assert with_ckpt.model.checkpoint == "/ckpt/nanonets" and with_ckpt.data.tokenizer == "/ckpt/nanonets/tokenizer"


def test_planner_accepts_it_on_8_devices():
  config = _root_config()
  mesh = shd.make_mesh(config.mesh)
  assert mesh.shape["fsdp"] == 8 == mesh.size
  rules = model_setup.parse_rules(config.sharding_rules)
  before = jax.live_arrays()  # held, so that no id below can be reused by a new array
  known = {id(a) for a in before}
  plan = memory.report_and_check(memory.plan_dpo(dpo_job.memory_run(config), mesh, rules), 80.0)  # an 80 GB GPU
  # The planner allocates nothing (arrays of earlier tests on this worker may be freed meanwhile).
  assert [a.shape for a in jax.live_arrays() if id(a) not in known] == []
  assert 4 * QWEN2_5_VL_3B_PARAMS / 8 <= plan.params < 1.01 * 4 * QWEN2_5_VL_3B_PARAMS / 8
  # trainable=language: the optimizer holds mu and nu of the language side only (< 2x the params).
  assert plan.gradients < 0.9 * plan.params
  assert plan.opt_state < 2 * plan.gradients + 64
