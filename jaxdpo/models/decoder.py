"""The decoder stack every text family shares: token table, block loop, final norm, (tied) head.

A family's decoder subclasses `DecoderStack`, builds its blocks and norm through `init_stack`, and
runs them with `run_blocks`; what differs between families (block internals, rotary tables, masks,
the embedding scale, the cache layout) stays in the family. Multimodal wrappers that hold such a
decoder as `language_model` reuse `LanguageModelHead` for the head and generation methods that
only forward to it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import attention, layers


class DecoderStack(nnx.Module):
  """Embedding, blocks, final norm and LM head of a causal decoder.

  `logit_softcap` (None unless a family sets it) is applied by `logits`; chunked log-prob code
  reads it from the model so that training applies the same cap.
  """

  logit_softcap: float | None = None

  def init_stack(self, cfg, make_block: Callable[[int], nnx.Module], make_norm: Callable[[], nnx.Module], *,
                 rngs: nnx.Rngs, param_dtype):
    """Creates `embed_tokens`, `layers`, `norm` and `lm_head` (None when tied), in that order.

    Args:
      cfg: the text config (`vocab_size`, `hidden_size`, `num_layers`, `tie_word_embeddings`).
      make_block: layer index -> block module.
      make_norm: () -> the final norm.
      rngs: parameter initialisation keys.
      param_dtype: parameter storage dtype.
    """
    self.config = cfg
    init = jax.nn.initializers.normal(0.02)
    table_shape, table_axes = (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")
    self.embed_tokens = layers.param(rngs, init, table_shape, table_axes, param_dtype)
    self.layers = nnx.List([make_block(i) for i in range(cfg.num_layers)])
    self.norm = make_norm()
    self.lm_head = None if cfg.tie_word_embeddings else layers.param(rngs, init, table_shape, table_axes, param_dtype)

  def unembedding(self):
    """The LM-head matrix [V, D] (the unscaled embedding when tied)."""
    return (self.embed_tokens if self.lm_head is None else self.lm_head)[...]

  def logits(self, h_BTD):
    """Full logits [B, T, V]; for tests and generation only (training uses chunked log-probs)."""
    with jax.named_scope("lm_head"):
      logits_BTV = jnp.einsum("BTD,VD->BTV", h_BTD, self.unembedding().astype(h_BTD.dtype))
      if self.logit_softcap is not None:
        logits_BTV = jnp.tanh(logits_BTV / self.logit_softcap) * self.logit_softcap
      return logits_BTV

  def run_blocks(self, x_BTD, block_inputs: Callable[[nnx.Module], tuple], kv_cache=None, cache_index=None):
    """Runs every block, then the final norm.

    Args:
      x_BTD: input embeddings.
      block_inputs: block -> the positional inputs it takes after x (rotary tables, mask),
        so that families with several layer kinds pick the right ones per block.
      kv_cache: optional list of per-layer caches; each block returns its updated one.
      cache_index: int scalar, the cache slot of this call's first token.

    Returns:
      (hidden [B, T, D] after the final norm, new kv cache or None).
    """
    new_cache = [] if kv_cache is not None else None
    for i, block in enumerate(self.layers):
      layer_cache = None if kv_cache is None else kv_cache[i]
      with jax.named_scope(f"block_{i}"):
        x_BTD, c = block(x_BTD, *block_inputs(block), layer_cache, cache_index)
      x_BTD = layers.constrain_batch(x_BTD)  # keep rows split over the batch axes
      if new_cache is not None:
        new_cache.append(c)
    with jax.named_scope("final_norm"):
      return self.norm(x_BTD), new_cache

  def hidden_states(self, inputs: dict):
    """The family-neutral entry used by DPO/SFT steps: inputs dict -> hidden [B, T, D].

    Keys: `input_ids`, `positions`, `segment_ids` (all int [B, T]); prefix-shared rows add
    `attn_order` and `attn_branch` (`attention.from_inputs`).
    """
    h_BTD, _ = self(input_ids=inputs["input_ids"], positions=inputs["positions"],
                    segment_ids=inputs["segment_ids"], structure=attention.from_inputs(inputs))
    return h_BTD


def embed_or_pass(stack: DecoderStack, input_ids, inputs_embeds):
  """The decoder input: `stack.embed(input_ids)` or ready embeddings; exactly one must be given."""
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  return stack.embed(input_ids) if inputs_embeds is None else inputs_embeds


class LanguageModelHead:
  """Head and generation methods of a multimodal model that forward to `self.language_model`."""

  def unembedding(self):
    """The LM-head matrix [V, D] of the language model."""
    return self.language_model.unembedding()

  def logits(self, h_BTD):
    """Full logits; for tests and generation only (training uses chunked log-probs)."""
    return self.language_model.logits(h_BTD)

  @property
  def logit_softcap(self):
    return self.language_model.logit_softcap

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """The language model's generation cache; images only enter through the prompt."""
    return self.language_model.init_cache(batch_size, max_len, dtype)

  def decode(self, tokens_B, cache: dict):
    """Appends one token per row; returns (fp32 logits [B, V], cache)."""
    return self.language_model.decode(tokens_B, cache)
