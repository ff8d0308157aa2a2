"""Pair log-probs of packed rows (`jaxdpo.data.packing`): several prefix-shared pairs per row.

The model runs once per packed row; segment ids keep pairs apart and branches keep each rejected
from its chosen (the dense path of `jaxdpo.models.attention`). The LM head runs on the row's
completion positions only (`score_index`), and the per-token log-probs are summed per pair and
completion by `score_slot` (2 * pair slot + 0 chosen / 1 rejected). Pair arrays are [R * M, 2]
over every pair slot; `valid` marks the slots that hold a pair, and the DPO step masks the others
out of its sums, so the math is the two-row step's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.objectives import logprobs


def is_packed(batch) -> bool:
  return "pair_valid" in batch


def valid(batch) -> jax.Array:
  """fp32 [R * M]: 1 on pair slots that hold a pair."""
  return batch["pair_valid"].reshape(-1).astype(jnp.float32)


def n_pairs(batch) -> jax.Array:
  return batch["pair_valid"].astype(jnp.float32).sum()


def chosen_tokens(batch) -> jax.Array:
  """Completion tokens of every chosen response (the sft term's normaliser)."""
  chosen = (batch["score_slot"] % 2 == 0) & (batch["score_mask"] != 0)
  return chosen.astype(jnp.float32).sum()


def pair_logps(graphdef, params, batch, cfg):
  """Summed completion log-probs [R*M, 2], per-pair plain sums [R*M, 2, 1], token counts [R*M, 2].

  The middle value stands where the other layouts return per-token log-probs: the DPO step only
  sums it (the sft term), so each completion's plain sum is its one "token" here. Empty pair
  slots get counts of 1 (never 0: IPO and sigmoid_norm divide by them) and sums of 0.
  """
  params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
  model = nnx.merge(graphdef, params)
  h_RTD = model.hidden_states(cfg.model_inputs(batch, 1))
  h_RQD = jnp.take_along_axis(h_RTD, batch["score_index"][:, :, None], axis=1)
  softcap = logprobs.resolve_softcap(cfg.logit_softcap, model)
  lp_RQ = logprobs.token_logps(h_RQD, model.unembedding(), batch["score_targets"], chunk_size=cfg.logprob_chunk,
                               logit_softcap=softcap, unroll=cfg.logprob_unroll)
  r, m = batch["pair_valid"].shape
  mask_RQ = batch["score_mask"].astype(jnp.float32)
  # One-hot over the row's 2M completions: an exact per-completion sum, [R, Q, 2M] of 0/1.
  onehot_RQS = (batch["score_slot"][:, :, None] == jnp.arange(2 * m)).astype(jnp.float32) * mask_RQ[:, :, None]
  plain_RS = jnp.einsum("RQ,RQS->RS", lp_RQ, onehot_RQS)
  counts_RS = onehot_RQS.sum(1)
  seq_RS = plain_RS
  if cfg.loss.ld_alpha != 1.0:
    # LD-DPO: tokens past the shorter completion of their pair weigh ld_alpha.
    shorter_RM = jnp.minimum(counts_RS[:, 0::2], counts_RS[:, 1::2])
    shorter_RQ = jnp.take_along_axis(shorter_RM, batch["score_slot"] // 2, axis=1)
    weight_RQ = jnp.where(batch["score_rank"] < shorter_RQ, 1.0, cfg.loss.ld_alpha)
    seq_RS = jnp.einsum("RQ,RQS->RS", lp_RQ * weight_RQ, onehot_RQS)
  valid_n = valid(batch)
  counts = jnp.where(valid_n[:, None] > 0, counts_RS.reshape(r * m, 2), 1.0)
  plain = plain_RS.reshape(r * m, 2)
  return seq_RS.reshape(r * m, 2), plain[:, :, None], counts
