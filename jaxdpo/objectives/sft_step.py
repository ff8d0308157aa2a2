"""The SFT step: completion-only cross-entropy, sharing log-probs and the update with DPO.

Batch layout: input_ids, segment_ids, positions, loss_mask, all int32 [B, T], plus the family's
image arrays with a leading batch axis (see `jaxdpo.data.step_inputs`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.train import accumulate
from jaxdpo.train import update
from jaxdpo.data import step_inputs
from jaxdpo.objectives import logprobs

SEQ_KEYS = ("input_ids", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class SFTStepConfig:
  """Static configuration of the SFT step."""

  compute_dtype: jnp.dtype = jnp.float32
  grad_accum: int = 1
  logprob_chunk: int = 256
  logit_softcap: float | None = None  # None: the model's own soft cap


def nll_terms(params, batch, graphdef, *, compute_dtype, chunk_size: int, logit_softcap, n_tokens):
  """This micro-batch's share of the token-mean NLL (normalised by the global token count).

  `logit_softcap` None means: whatever the model applies (`logprobs.resolve_softcap`).
  """
  params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
  model = nnx.merge(graphdef, params)
  h_BTD = model.hidden_states(step_inputs.seq_inputs(batch))
  seq, _, counts = logprobs.completion_logps(h_BTD, model.unembedding(), batch["input_ids"], batch["loss_mask"],
                                             chunk_size=chunk_size,
                                             logit_softcap=logprobs.resolve_softcap(logit_softcap, model))
  nll = -seq.sum()
  return nll / jnp.maximum(n_tokens, 1.0), {"tokens": counts.sum()}


def make_train_step(graphdef, tx, scfg, mesh, state_shardings, schedule=None):
  """Jitted SFT `step(state, None, batch) -> (state, metrics)` with `loss` = mean NLL per token."""
  def grad_fn(params, ref, batch):
    del ref
    n_tokens = batch["loss_mask"][:, 1:].astype(jnp.float32).sum()
    terms = lambda p, mb: nll_terms(p, mb, graphdef, compute_dtype=scfg.compute_dtype,
                                    chunk_size=scfg.logprob_chunk, logit_softcap=scfg.logit_softcap,
                                    n_tokens=n_tokens)
    (loss, sums), grads = accumulate.accumulate(terms, params, batch, scfg.grad_accum, with_grad=True)
    return {"loss": loss, "tokens": sums["tokens"]}, grads

  return update.make_update_step(grad_fn, tx, mesh, state_shardings, None, schedule)
