"""The DPO step's terms: pair log-probs, each micro-batch's share of the loss, the metrics.

Batch layout (host numpy, produced by `jaxdpo.data.pipeline`): every array has a leading
pair axis B and a second axis of size 2 (chosen, rejected):
  input_ids   int32 [B, 2, T]
  segment_ids int32 [B, 2, T]   1 for real tokens, 0 for padding
  positions   int32 [B, 2, T]
  loss_mask   int32 [B, 2, T]   1 on completion tokens
  ref_logps   fp32  [B, 2]      optional: cached reference log-probs
  images      per pair, leading pair axis (the family's layout, see `jaxdpo.models.batching`)
Chosen and rejected of a pair stay on the same device (the pair axis is the sharded one), and
the vision tower runs once per pair: both rows read the pair's image features. The prefix-shared
layout (one row [P | C | R] per pair, `jaxdpo.data.shared_rows`) gives the same values through
`shared_step`. The jitted
update that sums these terms over micro-batches is `jaxdpo.train.update.make_train_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import batching, decoder, lora
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import logprobs, packed_step, shared_step

PAIR_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static configuration of the DPO step.

  Attributes:
    model_inputs: the family's `(batch, rows_per_record) -> model inputs` (`Family.model_inputs`);
      the text layout by default.
  """

  loss: losses.DPOLossConfig
  compute_dtype: jnp.dtype = jnp.float32
  grad_accum: int = 1
  logprob_chunk: int = 256
  logprob_unroll: bool = False  # unrolled chunk loop, for FLOP counting (`bench --analyze`)
  logit_softcap: float | None = None  # None: use the model's own `logit_softcap`
  model_inputs: Callable[[dict, int], dict] = batching.text_inputs
  lora_reference: bool = False  # LoRA: the reference is the policy with its adapters off (`models.lora.disabled`)
  blocks: decoder.BlockPlan = decoder.BlockPlan()  # remat policy and layer scan of the decoder blocks
  # Static completion window (`logprobs.completion_logps`): the LM head scores this many positions per row from
  # the completion's start instead of all T-1. None: the whole row. Jobs derive it from their data
  # (`logprobs.window_for`) and refuse longer completions on the host (`logprobs.check_window`).
  completion_window: int | None = None

  def __post_init__(self):
    losses.check_grad_accum(self.loss, self.grad_accum)


def pair_logps(graphdef, params, batch, cfg: StepConfig):
  """Summed completion log-probs [B, 2], per-token log-probs [B, 2, K], token counts [B, 2].

  K is T-1 (the whole row) or `cfg.completion_window`; the per-token values are in sequence
  order, 0 off the completion.

  With `cfg.loss.ld_alpha` < 1 the sums are LD-DPO's (`dpo_losses.length_desensitized`), for the
  policy and the (live or cached) reference alike, as TRL computes both. A prefix-shared batch
  (`score_index` present) is scored by `shared_step.pair_logps` (per-token arrays [B, 2, K]); a
  packed one (`pair_valid` present) by `packed_step.pair_logps` (arrays over its R * M pair slots).
  """
  if isinstance(params, decoder.StackedParams):  # layers stacked once outside the step (the frozen reference)
    cast = lambda tree: jax.tree.map(lambda p: p.astype(cfg.compute_dtype), tree)
    stacked = dataclasses.replace(params, stacks=cast(params.stacks))
    with decoder.prestacked(stacked):
      return pair_logps(graphdef, params.full(), batch, cfg)
  if packed_step.is_packed(batch) or is_shared(batch):
    with decoder.planned(cfg.blocks):  # the blocks' remat / scan plan, as below
      layout = packed_step if packed_step.is_packed(batch) else shared_step
      return layout.pair_logps(graphdef, params, batch, cfg)
  params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
  model = nnx.merge(graphdef, params)
  flat = cfg.model_inputs(batch, 2)  # rows c0, r0, c1, r1, ...
  with decoder.planned(cfg.blocks):
    h_BTD = model.hidden_states(flat)
  out = logprobs.completion_logps(h_BTD, model.unembedding(), flat["input_ids"], flat["loss_mask"],
                                  chunk_size=cfg.logprob_chunk, logit_softcap=softcap(cfg, model),
                                  unroll=cfg.logprob_unroll, window=cfg.completion_window)
  b = batch["input_ids"].shape[0]
  seq, per_tok, counts = out.sums.reshape(b, 2), out.per_token.reshape(b, 2, -1), out.counts.reshape(b, 2)
  if cfg.loss.ld_alpha != 1.0:  # the window keeps the tokens' order, so LD-DPO's token index is unchanged
    seq = losses.length_desensitized(per_tok, out.mask.reshape(b, 2, -1), cfg.loss.ld_alpha)
  return seq, per_tok, counts


def is_shared(batch) -> bool:
  """Whether a batch is in the prefix-shared layout (`jaxdpo.data.shared_rows`)."""
  return "score_index" in batch


def softcap(cfg, model):
  """The final-logit soft cap: the step's override, else what the model applies in `logits`."""
  return logprobs.resolve_softcap(cfg.logit_softcap, model)


def params_identical(params, ref_params) -> jax.Array:
  """A traced bool: every policy tensor equals the reference's bit for bit (same shapes and dtypes).

  Two trees stacked alike (`decoder.StackedParams`) are compared stack by stack; when only one is
  stacked, it is compared through its per-layer slices (`full()`).
  """
  if isinstance(params, decoder.StackedParams) != isinstance(ref_params, decoder.StackedParams):
    params, ref_params = (p.full() if isinstance(p, decoder.StackedParams) else p for p in (params, ref_params))
  a, b = jax.tree.leaves(params), jax.tree.leaves(ref_params)
  if jax.tree.structure(params) != jax.tree.structure(ref_params) or any(
      x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b)):
    return jnp.asarray(False)
  return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(a, b)]))


def loss_terms(params, ref_params, batch, graphdef, cfg: StepConfig, n_pairs, n_chosen_tokens):
  """This micro-batch's share of the global loss and the metric sums.

  The loss is normalised by the *global* pair and token counts, so summing the shares of
  micro-batches gives exactly the loss (and gradient) of the whole batch.

  When the policy equals the reference bit for bit in the compute dtype (step 1), the reference
  log-probs are the policy's own, so rewards, margins and accuracy are exactly 0 as in TRL. Otherwise the two
  forward passes, compiled differently (only one is differentiated), differ by rounding (~1e-6)
  and step 1's accuracy is noise. The comparison reads both trees once per micro-batch, which
  the two forward passes read anyway.
  """
  seq, per_tok, counts = pair_logps(graphdef, params, batch, cfg)
  if "ref_logps" in batch:
    ref = batch["ref_logps"].astype(jnp.float32).reshape(seq.shape)
  elif cfg.loss.reference_free:
    ref = jnp.zeros_like(seq)
  else:
    if cfg.lora_reference:  # one set of base weights: the reference is the policy with B = 0
      ref_params = lora.disabled(params)
    ref, _, _ = pair_logps(graphdef, jax.lax.stop_gradient(ref_params), batch, cfg)
    ref = jax.lax.stop_gradient(ref)
    # The reference is held in the compute dtype (`jobs.dpo.reference_copy`): compare what the step reads.
    cast = lambda tree: jax.tree.map(lambda p: p.astype(cfg.compute_dtype), tree)
    same = params_identical(cast(params), cast(ref_params))
    ref = jnp.where(same, jax.lax.stop_gradient(seq), ref)
  pl, ratio_c, ratio_r = losses.pair_losses(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1],
                                            cfg.loss)
  if packed_step.is_packed(batch):
    pl = pl * packed_step.valid(batch)  # empty pair slots; their rewards, margins and log-probs are 0
  loss = pl.sum() / n_pairs
  if cfg.loss.sft_weight:
    # TRL's "sft" term (and jaxdpo's rpo_alpha): mean NLL over every chosen completion token of the batch.
    loss = loss + cfg.loss.sft_weight * (-per_tok[:, 0].sum()) / jnp.maximum(n_chosen_tokens, 1.0)
  sums = losses.metric_sums(pl, ratio_c, ratio_r, seq[:, 0], seq[:, 1], cfg.loss.beta)
  return loss, sums


def objective(graphdef, cfg: StepConfig):
  """The DPO objective in the form `jaxdpo.train.update` sums over micro-batches.

  Returns:
    `bind(ref_params, batch) -> (terms, finish)`: `terms(params, micro_batch)` gives a
    micro-batch's (loss share, metric sums), normalised by the whole batch's counts;
    `finish(loss, sums)` turns the totals into the logged metrics (TRL's names).
  """
  def bind(ref_params, batch):
    if packed_step.is_packed(batch):
      n_pairs, n_chosen_tokens = packed_step.n_pairs(batch), packed_step.chosen_tokens(batch)
    else:
      n_pairs = batch["input_ids"].shape[0]
      n_chosen_tokens = (shared_step.chosen_tokens(batch) if is_shared(batch)
                         else batch["loss_mask"][:, 0, 1:].astype(jnp.float32).sum())

    def terms(params, micro_batch):
      return loss_terms(params, ref_params, micro_batch, graphdef, cfg, n_pairs, n_chosen_tokens)

    def finish(loss, sums):
      metrics = {k: v / n_pairs for k, v in sums.items()}
      metrics["loss"] = loss
      return metrics

    return terms, finish

  return bind
