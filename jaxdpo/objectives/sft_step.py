"""The SFT step's terms: completion-only cross-entropy, sharing log-probs and the update with DPO.

Batch layout: input_ids, segment_ids, positions, loss_mask, all int32 [B, T], plus the family's
image arrays with a leading batch axis (see `jaxdpo.models.batching`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import batching, decoder
from jaxdpo.objectives import logprobs

SEQ_KEYS = ("input_ids", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class SFTStepConfig:
  """Static configuration of the SFT step."""

  compute_dtype: jnp.dtype = jnp.float32
  grad_accum: int = 1
  logprob_chunk: int = 256
  logit_softcap: float | None = None  # None: the model's own soft cap
  model_inputs: Callable[[dict, int], dict] = batching.text_inputs  # the family's `Family.model_inputs`
  blocks: decoder.BlockPlan = decoder.BlockPlan()  # remat policy and layer scan of the decoder blocks
  completion_window: int | None = None  # static LM-head window (`dpo_step.StepConfig.completion_window`)


def nll_terms(params, batch, graphdef, cfg: SFTStepConfig, n_tokens):
  """This micro-batch's share of the token-mean NLL (normalised by the global token count)."""
  params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
  model = nnx.merge(graphdef, params)
  with decoder.planned(cfg.blocks):
    h_BTD = model.hidden_states(cfg.model_inputs(batch, 1))
  out = logprobs.completion_logps(h_BTD, model.unembedding(), batch["input_ids"], batch["loss_mask"],
                                  chunk_size=cfg.logprob_chunk,
                                  logit_softcap=logprobs.resolve_softcap(cfg.logit_softcap, model),
                                  window=cfg.completion_window)
  nll = -out.sums.sum()
  return nll / jnp.maximum(n_tokens, 1.0), {"tokens": out.counts.sum()}


def objective(graphdef, cfg: SFTStepConfig):
  """The SFT objective for `jaxdpo.train.update` (see `dpo_step.objective`); `loss` = mean NLL per token."""
  def bind(ref, batch):
    del ref  # SFT has no reference model
    n_tokens = batch["loss_mask"][:, 1:].astype(jnp.float32).sum()

    def terms(params, micro_batch):
      return nll_terms(params, micro_batch, graphdef, cfg, n_tokens)

    def finish(loss, sums):
      return {"loss": loss, "tokens": sums["tokens"]}

    return terms, finish

  return bind
