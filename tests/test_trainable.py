"""`config.model.trainable` (issue 12, acceptance 1): with `language`, the vision tower and the
projector stay bit-identical through training and have no optimizer state; the planner's
optimizer and gradient bytes drop by exactly their share on the 3B preset (8 fake devices)."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest

import _vision_job_helpers as VH
from jaxdpo.data import pipeline, tokenize
from jaxdpo.errors import ConfigError
from jaxdpo.jobs import common, model_setup
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.models import trainable as trainable_lib
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import optim, update
from tests._dpo_helpers import ROOT

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def _flat(tree):
  return {trainable_lib.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
  root = tmp_path_factory.mktemp("vl")
  tok_dir = str(root / "tok")
  VH.qwen_processor_files(tok_dir)
  _, _, prefs = VH.vision_records(str(root / "data"), n=4, seed=0)
  c = config_defaults.base()
  c.model.family, c.model.preset = "qwen2_5_vl", "tiny_vl"
  c.data.tokenizer, c.data.max_length, c.train.progress = tok_dir, 64, False
  c.optim.lr, c.optim.warmup_steps, c.train.batch_size = 1e-2, 0, 4
  tok = tokenize.load_tokenizer(tok_dir)
  vision = common.vision_adapter(c, tok)
  pairs = dpo_job.tokenize_preferences(prefs, tok, c, desc="t", vision=vision)[:4]
  vision = vision.with_budget(pairs, [])
  mesh = shd.make_mesh(ONE)
  bundle = model_setup.setup_model(c.model, mesh, shd.DEFAULT_RULES, seed=0)
  batch = shd.put_batch(pipeline.collate_pairs(pairs, max_length=64, pad_id=0, vision=vision), mesh)
  return dict(config=c, mesh=mesh, bundle=bundle, batch=batch)


def _train(vl, spec: str, steps: int = 2):
  """(initial params, final params, opt_state) after `steps` DPO steps with `model.trainable=spec`."""
  c, mesh, bundle = vl["config"], vl["mesh"], vl["bundle"]
  c.model.trainable = spec
  copy = jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p), out_shardings=bundle.param_shardings)
  initial = jax.device_get(bundle.params)
  mask = model_setup.trainable_mask(c.model, bundle)
  tx, schedule = optim.make_optimizer(c.optim, 10)
  state = train.init_state(dataclasses_replace_params(bundle, copy(bundle.params)), tx, mesh, mask)
  scfg = dpo_job.step_config(c, bundle.family)
  step_fn = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh,
                                   jax.tree.map(lambda x: x.sharding, state), bundle.param_shardings, schedule,
                                   trainable_mask=mask)
  ref = copy(bundle.params)
  for _ in range(steps):
    state, metrics = step_fn(state, ref, vl["batch"])
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  return initial, jax.device_get(state["params"]), state["opt_state"]


def dataclasses_replace_params(bundle, params):
  import dataclasses
  return dataclasses.replace(bundle, params=params)


def test_language_keeps_vision_and_projector_bit_identical_and_out_of_the_optimizer(vl):
  initial, final, opt_state = _train(vl, "language")
  before, after = _flat(initial), _flat(final)
  vision = [k for k in before if k.startswith("visual/")]
  assert any("merger" in k for k in vision)  # the projector is part of the frozen side
  for k in vision:
    assert np.array_equal(before[k], after[k]), k
  changed = [k for k in before if not k.startswith("visual/") and not np.array_equal(before[k], after[k])]
  assert len(changed) > 0.9 * (len(before) - len(vision))  # the language model did train
  # No optimizer leaf for a vision parameter: mu and nu hold the language model's leaves only.
  opt_paths = list(_flat(opt_state))
  assert not [p for p in opt_paths if "visual" in p]
  n_lang = len(before) - len(vision)
  assert sum(p.endswith(tuple(k for k in before if not k.startswith("visual/"))) for p in opt_paths) == 2 * n_lang


def test_all_trains_the_vision_side_too(vl):
  """The control: without the mask the same steps do move the vision tower and the projector."""
  initial, final, opt_state = _train(vl, "all")
  before, after = _flat(initial), _flat(final)
  assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("visual/merger"))
  assert any("visual" in p for p in _flat(opt_state))


def test_regex_trains_only_matching_paths(vl):
  initial, final, _ = _train(vl, r"^language_model/layers/0/", steps=1)
  before, after = _flat(initial), _flat(final)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert moved and all(k.startswith("language_model/layers/0/") for k in moved)


def test_bad_specs_are_refused(vl):
  family, params = vl["bundle"].family, vl["bundle"].params
  with pytest.raises(ConfigError, match="leaves no parameter trainable"):
    trainable_lib.mask_of(params, trainable_lib.predicate("no_such_param", family), "no_such_param")
  with pytest.raises(ConfigError, match="valid regex"):
    trainable_lib.predicate("(", family)


def _config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_planner_counts_only_trainable_optimizer_and_gradient_bytes_on_the_3b_preset():
  config = _config("qwen2_5_vl_3b_dpo")
  mesh = shd.make_mesh(config.mesh)
  assert mesh.size == 8
  rules = model_setup.parse_rules(config.sharding_rules)
  config.model.trainable = "all"
  full = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  config.model.trainable = "language"
  live_before = jax.live_arrays()  # held, so no id below is reused by a new array
  known = {id(a) for a in live_before}
  lang = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  assert [a.shape for a in jax.live_arrays() if id(a) not in known] == []  # planner only: nothing allocated
  # The vision side's per-device bytes, counted here from the sharded abstract tree by path.
  family = dpo_job.model_setup.resolve_model(config.model)[0]
  abstract = memory._abstract_params(family.name, family.presets[config.model.preset](), np.dtype("float32"))
  params = memory.with_shardings(model_setup.nnx.to_pure_dict(abstract), shd.param_shardings(abstract, rules, mesh))
  vision = sum(memory._leaf_bytes(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if trainable_lib.path_str(p).startswith("visual/"))
  assert vision > 0.1 * full.params  # ~0.67B of 3.75B parameters
  assert lang.params == full.params and lang.reference == full.reference
  assert full.opt_state - lang.opt_state == 2 * vision  # AdamW mu + nu of the vision side
  assert full.gradients - lang.gradients == vision
