"""Prefix sharing (issue 16 item 2, acceptance 1): one row [P | C | R] per pair gives the two-row
step's loss, metrics and gradients (fp32; loss and metrics relative 1e-5, gradients 1e-5 of each
tensor's max), for Qwen2 text, Qwen2.5-VL with images, Gemma 3 with images (image groups in the
prompt, sliding windows crossing the prompt/completion boundary), and on a data=2 x fsdp=2 mesh.

Both layouts run through the real train step (`update.make_train_step`) with `grad_recorder` in
place of the optimizer, so the gradient compared is the one the step computed, with a live
reference that differs from the policy (another seed), so rewards and margins are not zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _vision_job_helpers as VH
from jaxdpo.data import pipeline, shared_rows, tokenize
from jaxdpo.jobs import common
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.objectives import dpo_step as step_lib
from tests import _layout_helpers as LH

PRESETS = {"qwen2": "tiny", "qwen2_5_vl": "tiny_vl", "gemma3": "tiny"}


def _setup(family, root):
  c = config_defaults.base()
  c.model.family, c.model.preset = family, PRESETS[family]
  c.data.max_length, c.train.progress, c.train.batch_size = LH.MAX_LENGTH, False, 4
  vision = None
  if family == "qwen2":
    tok = tokenize.load_tokenizer(c.data.tokenizer)
    prefs = c.data.train
  else:
    tok_dir = str(root / "tok")
    (VH.qwen_processor_files if family == "qwen2_5_vl" else VH.gemma_processor_files)(tok_dir)
    _, _, prefs = VH.vision_records(str(root / "data"), n=6, seed=0)
    c.data.tokenizer = tok_dir
    tok = tokenize.load_tokenizer(tok_dir)
    vision = common.vision_adapter(c, tok)
  pairs = dpo_job.tokenize_preferences(prefs, tok, c, desc="t", vision=vision)[:4]
  if vision is not None:
    vision = vision.with_budget(pairs)
  length, slots = shared_rows.shape_for(pairs)
  pad = tokenize.pad_token_id(tok)
  two = pipeline.collate_pairs(pairs, max_length=LH.MAX_LENGTH, pad_id=pad, vision=vision)
  shared = pipeline.collate_shared(pairs, max_length=LH.MAX_LENGTH, pad_id=pad, vision=vision, length=length,
                                   slots=slots)
  return dict(config=c, pairs=pairs, two=two, shared=shared, bundles={})


@pytest.fixture(scope="module", params=sorted(PRESETS))
def data(request, tmp_path_factory):
  return _setup(request.param, tmp_path_factory.mktemp(request.param))


def test_shared_rows_hold_each_pair_once(data):
  """The layout itself: shapes, one row per pair, R's positions continuing from P's end, images
  per pair untouched; and the layout is shorter than the two rows it replaces."""
  two, shared = data["two"], data["shared"]
  b = len(data["pairs"])
  assert shared["input_ids"].shape[0] == b and shared["input_ids"].ndim == 2
  assert shared["segment_ids"].sum() < two["segment_ids"].sum()  # the prompt is held once
  for i, p in enumerate(data["pairs"]):
    n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
    order = shared["attn_order"][i]
    np.testing.assert_array_equal(order[n_p + n_c:n_p + n_c + n_r], n_p + np.arange(n_r))
    assert shared["score_index"][i, 1, 0] == n_p - 1  # rejected's first token: from the last prompt slot
    np.testing.assert_array_equal(shared["score_targets"][i, 1, :n_r], p.rejected)
  for k in two:
    if k not in ("input_ids", "segment_ids", "positions", "loss_mask"):
      np.testing.assert_array_equal(shared[k], two[k])
  if data["config"].model.family == "gemma3":
    # Windows cross the prompt/completion boundary and the prompts hold images.
    window = 5
    assert min(len(p.prompt) for p in data["pairs"]) > window
    assert (two["num_images"] > 0).any()


def test_shared_step_equals_two_row_step(data):
  LH.assert_same(LH.step_grads(data, data["shared"]), LH.step_grads(data, data["two"]))


def test_shared_step_on_a_mesh(data):
  """data=2 x fsdp=2 with two accumulated micro-batches, against the two-row step on one device."""
  if data["config"].model.family != "qwen2":
    pytest.skip("one family on the mesh keeps the test short; the layout code is family-neutral")
  LH.assert_same(LH.step_grads(data, data["shared"], LH.MESH, grad_accum=2), LH.step_grads(data, data["two"]))


def test_negative_control_rejected_seeing_chosen(data):
  """With the branches erased (every token sees every earlier-ordered token of the row, so rejected
  attends to chosen and chosen to rejected's first tokens), the rejected log-probs move far beyond
  the tolerance: the equality above can fail."""
  if data["config"].model.family != "qwen2":
    pytest.skip("one family suffices for the control")
  broken = dict(data["shared"], attn_branch=np.zeros_like(data["shared"]["attn_branch"]))
  m, _ = LH.step_grads(data, broken)
  m0, _ = LH.step_grads(data, data["two"])
  # 10x the tolerance (the tiny random model has near-uniform logits: 5.8e-4 relative measured).
  assert abs(m["logps/rejected"] - m0["logps/rejected"]) > 1e-4 * abs(m0["logps/rejected"])


def test_ld_dpo_sums_match(data):
  """LD-DPO's weighting reads completion order only: the shared layout's [B, 2, K] per-token
  log-probs give the two-row sums (and it is not the plain sum, so the check has teeth)."""
  if data["config"].model.family != "qwen2":
    pytest.skip("layout-only check; one family suffices")
  import dataclasses
  mesh, bundle = LH.model_bundle(data, LH.ONE, seed=0)
  scfg = dpo_job.step_config(data["config"], bundle.family)
  ld = dataclasses.replace(scfg, loss=dataclasses.replace(scfg.loss, ld_alpha=0.5))
  run = jax.jit(lambda p, b, cfg: step_lib.pair_logps(bundle.graphdef, p, b, cfg)[0], static_argnums=2)
  got, want = (np.asarray(run(bundle.params, {k: jnp.asarray(v) for k, v in data[k].items()}, ld))
               for k in ("shared", "two"))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain = np.asarray(run(bundle.params, {k: jnp.asarray(v) for k, v in data["two"].items()}, scfg))
  assert np.abs(plain - want).max() > 1e-3 * np.abs(want).max()


def test_dpo_job_honours_data_layout(tmp_path):
  """`data.layout=shared` reaches the job: the first step's log-probs (policy = reference, so
  the loss itself is log 2 either way) equal the two-row job's, and a bad value is refused."""
  from jaxdpo.errors import ConfigError
  from jaxdpo.jobs import validate
  from tests._dpo_helpers import demo_config, read_metrics
  rows = {}
  for layout in ("pairs", "shared"):
    config = demo_config(**{"train.num_steps": 1, "train.log_every": 1, "train.ckpt_every": 0,
                            "data.layout": layout})
    dpo_job.run(config, str(tmp_path / layout))
    rows[layout] = read_metrics(str(tmp_path / layout))[-1]
  for k in ("logps/chosen", "logps/rejected"):
    assert abs(rows["shared"][k] - rows["pairs"][k]) <= 1e-5 * abs(rows["pairs"][k]), k
  with pytest.raises(ConfigError, match=r"data\.layout"):
    validate.check(demo_config(**{"data.layout": "packed?"}))
