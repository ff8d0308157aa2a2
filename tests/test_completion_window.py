"""The completion-only LM head (`StepConfig.completion_window`) held to the whole-row head.

The DPO and SFT steps with a static completion window give the same loss, metrics and gradients
as the same steps scoring every position (fp32; loss and metrics relative 1e-5, gradients 1e-5
relative to each tensor's max), with LD-DPO and the sft term (per-token values in order), a chunk
that does not divide the window, and prompts of different lengths. A completion longer than the
window is refused on the host by name (`check_window`) and gives a NaN sum in the step, never a
cut one. Negative control: a window that starts one token late fails the comparison.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.data.pipeline import collate_pairs, collate_seqs
from jaxdpo.data.tokenize import TokenizedPair, TokenizedSeq
from jaxdpo.errors import DataError
from jaxdpo.models import registry
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step, logprobs, sft_step
from jaxdpo.train import update
from tests._dpo_helpers import assert_grads_close, max_rel_err

T = 48


@pytest.fixture(scope="module")
def model():
  fam = registry.get_family("qwen2")
  split = lambda seed: nnx.split(fam.build(fam.presets["tiny"](), nnx.Rngs(seed), jnp.float32, "xla"), nnx.Param)
  (graphdef, params), (_, ref) = split(0), split(1)
  # The reference: another init, scaled up so that its logits are far from uniform and the rewards and
  # margins are O(1), not the remainder of a cancellation.
  return graphdef, nnx.to_pure_dict(params), jax.tree.map(lambda x: 4.0 * x, nnx.to_pure_dict(ref))


def _pairs():
  rng = np.random.default_rng(0)
  ids = lambda n: [int(x) for x in rng.integers(3, 500, n)]
  # prompt, chosen, rejected lengths: the longest completion is 13, the prompts differ.
  shapes = [(5, 13, 4), (20, 2, 11), (1, 9, 9), (30, 13, 1)]
  return [TokenizedPair(f"pair {i}", ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(shapes)]


def _dpo_metrics_and_grads(graphdef, params, ref, batch, cfg):
  fn = jax.jit(lambda p, r, b: update.accumulated(dpo_step.objective(graphdef, cfg), p, r, b, 1, with_grad=True))
  return fn(params, ref, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("loss_cfg", [losses.DPOLossConfig(beta=0.1),
                                      losses.DPOLossConfig(loss_type="sigmoid,sft", beta=0.1, ld_alpha=0.5)],
                         ids=["sigmoid", "sft+ld_alpha"])
def test_dpo_step_with_window_matches_whole_row(model, loss_cfg):
  graphdef, params, ref = model
  batch = collate_pairs(_pairs(), max_length=T, pad_id=0)
  window = logprobs.window_for(13, T)
  assert window == 16 < T - 1
  full = dpo_step.StepConfig(loss=loss_cfg, logprob_chunk=5)
  m_full, g_full = _dpo_metrics_and_grads(graphdef, params, ref, batch, full)
  m_win, g_win = _dpo_metrics_and_grads(graphdef, params, ref, batch, dataclasses.replace(full, completion_window=window))
  for k in m_full:
    assert max_rel_err(m_win[k], m_full[k]) <= 1e-5, (k, m_win[k], m_full[k])
  assert abs(float(m_full["rewards/margins"])) > 0.1
  assert_grads_close(_flat(g_win), _flat(g_full), 1e-5, "window vs whole row: ")


def test_negative_control_window_off_by_one_fails(model, monkeypatch):
  graphdef, params, ref = model
  batch = collate_pairs(_pairs(), max_length=T, pad_id=0)
  cfg = dpo_step.StepConfig(loss=losses.DPOLossConfig(beta=0.1), logprob_chunk=5)
  m_full, _ = _dpo_metrics_and_grads(graphdef, params, ref, batch, cfg)
  true_positions = logprobs.completion_positions

  def late(loss_mask, window):  # predictors one position late: each token scored from its own position
    j, mask, total = true_positions(loss_mask, window)
    return jnp.minimum(j + 1, loss_mask.shape[1] - 1), mask, total
  monkeypatch.setattr(logprobs, "completion_positions", late)
  m_bad, _ = _dpo_metrics_and_grads(graphdef, params, ref, batch, dataclasses.replace(cfg, completion_window=16))
  assert max_rel_err(m_bad["logps/chosen"], m_full["logps/chosen"]) > 1e-3


def test_sft_step_with_window_matches_whole_row(model):
  graphdef, params, _ = model
  rng = np.random.default_rng(1)
  seqs = [TokenizedSeq(f"seq {i}", [int(x) for x in rng.integers(3, 500, p)], [int(x) for x in rng.integers(3, 500, c)])
          for i, (p, c) in enumerate([(3, 17), (25, 4), (10, 10)])]
  batch = {k: jnp.asarray(v) for k, v in collate_seqs(seqs, max_length=T, pad_id=0).items()}
  full = sft_step.SFTStepConfig(logprob_chunk=7)
  win = dataclasses.replace(full, completion_window=logprobs.window_for(17, T))

  def run(cfg):
    fn = lambda p, b: update.accumulated(sft_step.objective(graphdef, cfg), p, None, b, 1, with_grad=True)
    return jax.jit(fn)(params, batch)
  (m_full, g_full), (m_win, g_win) = run(full), run(win)
  assert max_rel_err(m_win["loss"], m_full["loss"]) <= 1e-5
  assert float(m_win["tokens"]) == float(m_full["tokens"]) == 31
  assert_grads_close(_flat(g_win), _flat(g_full), 1e-5, "sft window vs whole row: ")


def test_completion_longer_than_window_is_refused_not_cut(model):
  graphdef, params, _ = model
  batch = collate_pairs(_pairs(), max_length=T, pad_id=0)
  with pytest.raises(DataError, match=r"row 0 has a completion span of 13 tokens, longer than the step's completion "
                                      r"window of 8"):
    logprobs.check_window(batch["loss_mask"], 8, "preference batch")
  logprobs.check_window(batch["loss_mask"], 13, "preference batch")  # exactly fits
  cfg = dpo_step.StepConfig(loss=losses.DPOLossConfig(beta=0.1), completion_window=8)
  seq, _, _ = jax.jit(lambda p, b: dpo_step.pair_logps(graphdef, p, b, cfg))(params, {k: jnp.asarray(v) for k, v
                                                                                       in batch.items()})
  seq = np.asarray(seq)
  assert np.isnan(seq[0, 0]) and np.isnan(seq[1, 1]) and np.isnan(seq[2, 0]) and np.isnan(seq[3, 0])
  assert np.isfinite(seq[1, 0]) and np.isfinite(seq[3, 1])  # 2 and 1 tokens fit


def test_window_for_rounds_up_and_caps():
  assert logprobs.window_for(13, 48) == 16
  assert logprobs.window_for(16, 48) == 16
  assert logprobs.window_for(17, 48) == 32
  assert logprobs.window_for(45, 48) == 47  # never more than every predictor
  assert logprobs.window_for(512, 1024) == 512


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
