"""Image batches on a multi-device mesh: DPO and SFT steps with images on (data=2, fsdp=2) of the 8
fake CPU devices equal the one-device steps (DPO with two accumulated micro-batches on the mesh).

The steps use plain SGD: the comparison is of gradients (what the mesh could get wrong), and SGD's
update is proportional to them. Adam divides by sqrt(v), so a gradient of ~1e-9 on one element
turns float-reduction-order noise into a full-size step there (seen: 1 of 1350 elements off by 4e-5
after two Adam steps, on one machine only).

Every image leaf leads with the batch (pair) axis, so `update.batch_shardings` splits it with
the token leaves: a pair and its images live on one device.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import _vision_job_helpers as VH
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import model_setup
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import update
from jaxdpo.data import pipeline, tokenize
from jaxdpo.jobs import common
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.jobs import sft as sft_job
from jaxdpo.objectives import sft_step

PRESETS = {"qwen2_5_vl": "tiny_vl", "gemma3": "tiny"}
MESH = {"data": 2, "fsdp": 2, "tensor": 1}
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
SGD_LR = 0.5  # large enough that the first update moves the loss by well over the check's 1e-4


@pytest.fixture(scope="module", params=sorted(PRESETS))
def data(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  tok_dir = str(root / "tok")
  (VH.qwen_processor_files if family == "qwen2_5_vl" else VH.gemma_processor_files)(tok_dir)
  sft, _, prefs = VH.vision_records(str(root / "data"), n=6, seed=0)
  c = config_defaults.base()
  c.model.family, c.model.preset = family, PRESETS[family]
  c.data.tokenizer, c.data.max_length, c.train.progress = tok_dir, 64, False
  c.optim.lr, c.optim.warmup_steps, c.train.batch_size = 1e-3, 0, 4
  tok = tokenize.load_tokenizer(tok_dir)
  vision = common.vision_adapter(c, tok)
  pairs = dpo_job.tokenize_preferences(prefs, tok, c, desc="t", vision=vision)[:4]
  seqs = sft_job.tokenize_sft(sft, tok, c, desc="t", vision=vision)[:4]
  vision = vision.with_budget(pairs, seqs)
  return dict(config=c, bundles={}, pair_batch=pipeline.collate_pairs(pairs, max_length=64, pad_id=0, vision=vision),
              seq_batch=pipeline.collate_seqs(seqs, max_length=64, pad_id=0, vision=vision))


def _bundle(data, mesh_sizes):
  """The model set up on a mesh, once per mesh (setting up even a tiny model takes seconds)."""
  key = tuple(sorted(mesh_sizes.items()))
  if key not in data["bundles"]:
    mesh = shd.make_mesh(mesh_sizes)
    data["bundles"][key] = mesh, model_setup.setup_model(data["config"].model, mesh, shd.DEFAULT_RULES, seed=0)
  return data["bundles"][key]


def _run(data, mesh_sizes, job="dpo", grad_accum=1, steps=2):
  config = data["config"]
  config.train.grad_accum = grad_accum
  mesh, bundle = _bundle(data, mesh_sizes)
  copy = jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p), out_shardings=bundle.param_shardings)
  params = copy(bundle.params)  # the train state is donated; the bundle's params stay intact
  schedule = lambda step: SGD_LR  # noqa: E731  (the loop logs the schedule's value)
  tx = optax.sgd(SGD_LR)
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  scfg = dpo_job.step_config(config, bundle.family)
  if job == "dpo":
    ref = copy(bundle.params)
    step_fn = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh, state_sh,
                                     bundle.param_shardings, schedule, grad_accum=scfg.grad_accum)
    batch = data["pair_batch"]
  else:
    ref = None
    sft_cfg = sft_step.SFTStepConfig(model_inputs=scfg.model_inputs)
    step_fn = update.make_train_step(sft_step.objective(bundle.graphdef, sft_cfg), tx, mesh, state_sh, None, schedule)
    batch = data["seq_batch"]
  sharded = shd.put_batch(batch, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, ref, sharded)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state["params"]), sharded, jax.device_get(bundle.params)


def _assert_same(run, ref):
  """Same losses, and the same parameter update per tensor relative to that update's scale."""
  (losses, params, _, initial), (ref_losses, ref_params, _, ref_initial) = run, ref
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert abs(ref_losses[1] - ref_losses[0]) > 1e-4  # the first update changed the model
  flat = jax.tree_util.tree_flatten_with_path
  rows = []
  for (path, a), b, a0, b0 in zip(flat(params)[0], jax.tree.leaves(ref_params), jax.tree.leaves(initial),
                                  jax.tree.leaves(ref_initial)):
    np.testing.assert_array_equal(a0, b0)  # both runs start from the same weights
    rows.append((jax.tree_util.keystr(path), np.asarray(a, np.float64) - a0, np.asarray(b, np.float64) - b0))
  largest = max(np.max(np.abs(ref_update)) for _, _, ref_update in rows)
  assert largest > 0
  for name, update, ref_update in rows:
    # A tensor whose true gradient is 0 (an attention key bias shifts every score of a query
    # equally, so softmax ignores it) holds only rounding noise: measure it against a floor of
    # 1e-3 of the largest update in the model instead of against its own noise.
    scale = max(np.max(np.abs(ref_update)), 1e-3 * largest)
    err = np.max(np.abs(update - ref_update)) / scale
    # 1e-3: float reduction order differs between the layouts, and two steps at a large lr
    # compound it (1.1e-4 seen on a Gemma 3 layer norm); a lost or doubled reduction is O(1).
    assert err <= 1e-3, f"{name}: update differs by {err:.2e} of max(its max, 1e-3 x the model's max)"


@pytest.mark.parametrize("job", ["dpo", "sft"])
def test_image_batches_on_a_mesh_match_one_device(data, job):
  assert len(jax.devices()) == 8
  single = _run(data, ONE, job)
  # DPO on the mesh also accumulates two micro-batches: one compile fewer than checking the mesh
  # and the accumulation apart, and either one going wrong breaks the equality.
  meshed = _run(data, MESH, job, grad_accum=2 if job == "dpo" else 1)
  _assert_same(meshed, single)
  # Image leaves are split over the 4 data-parallel devices along their leading (pair) axis.
  batch = meshed[2]
  assert "pixel_values" in batch
  for key, leaf in batch.items():
    assert leaf.sharding.spec[0] == ("data", "fsdp"), key
    assert leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // 4, key
