"""Pair log-probs of the prefix-shared layout: one row [P | C | R] per pair, the prompt computed once.

Layout: `jaxdpo.data.shared_rows`. The model runs once per pair (its attention structure keeps
rejected from seeing chosen, `attention.SHARED`); the completion tokens are then scored from
explicit predictor slots (`score_index`), never by shifting the row by one: rejected's first
token is predicted from the last prompt slot, not from chosen's end. The LM head runs on those
2K gathered positions only. The values returned are those of `dpo_step.pair_logps` on the
two-row layout, with per-token arrays in completion order ([B, 2, K] instead of [B, 2, T-1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import logprobs


def gather_positions(h_BTD, index_BK):
  """Hidden states at the given slots of each row: [B, K, D]."""
  return jnp.take_along_axis(h_BTD, index_BK[:, :, None], axis=1)


def pair_logps(graphdef, params, batch, cfg):
  """Summed completion log-probs [B, 2], per-token log-probs [B, 2, K], token counts [B, 2].

  Args:
    graphdef, params: the model (params cast to `cfg.compute_dtype`).
    batch: a shared-layout batch.
    cfg: the `dpo_step.StepConfig`.
  """
  params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
  model = nnx.merge(graphdef, params)
  h_BTD = model.hidden_states(cfg.model_inputs(batch, 1))
  b, _, k = batch["score_index"].shape
  h_BKD = gather_positions(h_BTD, batch["score_index"].reshape(b, 2 * k))
  softcap = logprobs.resolve_softcap(cfg.logit_softcap, model)
  lp_BK = logprobs.token_logps(h_BKD, model.unembedding(), batch["score_targets"].reshape(b, 2 * k),
                               chunk_size=cfg.logprob_chunk, logit_softcap=softcap, unroll=cfg.logprob_unroll)
  mask = batch["score_mask"].astype(jnp.float32)
  per_tok = lp_BK.reshape(b, 2, k) * mask
  seq, counts = per_tok.sum(-1), mask.sum(-1)
  if cfg.loss.ld_alpha != 1.0:
    seq = losses.length_desensitized(per_tok, mask, cfg.loss.ld_alpha)
  return seq, per_tok, counts


def chosen_tokens(batch) -> jax.Array:
  """Completion tokens of every chosen response of the batch (the sft term's normaliser)."""
  return batch["score_mask"][:, 0].astype(jnp.float32).sum()
