"""Packing (issue 16 item 3): several prefix-shared pairs per row give the two-row step's loss,
metrics and gradients (fp32; 1e-5 relative; gradients 1e-5 of each tensor's max), for Qwen2 and
the Gemma 3 text model (sliding windows crossing the prompt/completion and pair boundaries), and
on a data=2 x fsdp=2 mesh with two micro-batches. Packing with images: tests/test_packing_vision.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.data import packing, pipeline, tokenize
from jaxdpo.errors import ConfigError
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.objectives import dpo_step as step_lib
from tests import _layout_helpers as SL

PRESETS = {"qwen2": "tiny", "gemma3_text": "tiny_text"}
N_PAIRS = 8


def _setup(family):
  c = config_defaults.base()
  c.model.family, c.model.preset = family, PRESETS[family]
  c.data.max_length, c.train.progress, c.train.batch_size = SL.MAX_LENGTH, False, N_PAIRS
  tok = tokenize.load_tokenizer(c.data.tokenizer)
  pairs = dpo_job.tokenize_preferences(c.data.train, tok, c, desc="t")[:N_PAIRS]
  pad = tokenize.pad_token_id(tok)
  longest = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
  budget = 2 * longest  # room for two or more pairs per row
  two = pipeline.collate_pairs(pairs, max_length=SL.MAX_LENGTH, pad_id=pad)

  def packed(row_multiple):
    return pipeline.collate_packed(pairs, max_length=SL.MAX_LENGTH, pad_id=pad, pack_tokens=budget,
                                   row_multiple=row_multiple)
  return dict(config=c, pairs=pairs, two=two, packed=packed, bundles={})


@pytest.fixture(scope="module", params=sorted(PRESETS))
def data(request):
  return _setup(request.param)


def test_rows_really_hold_several_pairs(data):
  b = data["packed"](1)
  assert int(b["pair_valid"].sum()) == N_PAIRS
  assert b["pack_count"].max() >= 2 and b["input_ids"].shape[0] < N_PAIRS
  assert set(np.unique(b["segment_ids"])) >= {0, 1, 2}  # pairs are told apart by segment ids
  if data["config"].model.family == "gemma3_text":
    window = 5
    assert min(len(p.prompt) for p in data["pairs"]) > window  # windows cross into completions


def test_packed_step_equals_two_row_step(data):
  SL.assert_same(SL.step_grads(data, data["packed"](1)), SL.step_grads(data, data["two"]))


def test_packed_step_on_a_mesh(data):
  if data["config"].model.family != "qwen2":
    pytest.skip("one family on the mesh keeps the test short")
  packed = data["packed"](4 * 2)  # 4 batch devices x 2 micro-batches
  SL.assert_same(SL.step_grads(data, packed, SL.MESH, grad_accum=2), SL.step_grads(data, data["two"]))


def test_ld_and_sft_terms_match(data):
  """LD-DPO's tail weighting and the sft (rpo) term read per-completion order and chosen tokens."""
  if data["config"].model.family != "qwen2":
    pytest.skip("layout-only check")
  mesh, bundle = SL.model_bundle(data, SL.ONE, seed=0)
  _, ref_bundle = SL.model_bundle(data, SL.ONE, seed=1)
  scfg = dpo_job.step_config(data["config"], bundle.family)
  cfg = dataclasses.replace(scfg, loss=dataclasses.replace(scfg.loss, ld_alpha=0.5, rpo_alpha=0.5))
  assert cfg.loss.sft_weight == 0.5
  from jaxdpo.train import update

  @jax.jit
  def metrics(p, ref, b):
    return update.accumulated(step_lib.objective(bundle.graphdef, cfg), p, ref, b, 1, with_grad=False)[0]
  as_jnp = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  got = metrics(bundle.params, ref_bundle.params, as_jnp(data["packed"](1)))
  want = metrics(bundle.params, ref_bundle.params, as_jnp(data["two"]))
  want = {k: float(v) for k, v in want.items()}
  for k in SL.METRICS:
    assert abs(float(got[k]) - want[k]) <= 1e-5 * SL.metric_scale(k, want, cfg.loss.beta), k


def test_negative_control_pairs_seeing_each_other(data):
  """One segment for the whole row (pairs attend across their boundary) breaks the equality."""
  if data["config"].model.family != "qwen2":
    pytest.skip("one family suffices for the control")
  b = data["packed"](1)
  broken = dict(b, segment_ids=(b["segment_ids"] > 0).astype(np.int32))
  m, _ = SL.step_grads(data, broken)
  m0, _ = SL.step_grads(data, data["two"])
  assert abs(m["logps/chosen"] - m0["logps/chosen"]) > 1e-4 * abs(m0["logps/chosen"])


def test_bucketed_shapes_and_oversized_pairs():
  assert [packing.bucket_tokens(n, 256) for n in (1, 32, 33, 64, 65, 200)] == [32, 32, 64, 64, 128, 256]
  assert packing.assign([5, 4, 3, 3], 8) == [[0, 2], [1, 3]]
  with pytest.raises(Exception, match="pack_tokens=4"):
    packing.assign([5], 4)


def test_job_refuses_what_packing_does_not_cover():
  from tests._dpo_helpers import demo_config
  from jaxdpo.jobs import validate
  with pytest.raises(ConfigError, match=r"data\.layout=shared"):
    validate.check(demo_config(**{"data.pack_tokens": 128}))
  with pytest.raises(ConfigError, match=r"dpo\.reference"):
    dpo_job.check_packing(demo_config(**{"data.pack_tokens": 128, "data.layout": "shared",
                                         "dpo.reference": "cached"}))
  with pytest.raises(ConfigError, match="cuDNN"):
    dpo_job.check_packing(demo_config(**{"data.pack_tokens": 128, "data.layout": "shared",
                                         "model.attention_impl": "cudnn"}))
