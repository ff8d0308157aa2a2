"""Flax nnx port of the Qwen2 / Qwen2.5 decoder (the text tower of Qwen2.5-VL).

Held to `transformers.Qwen2ForCausalLM` (1D RoPE) and to the language model of
`Qwen2_5_VLForConditionalGeneration` (M-RoPE) by the parity tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import attention, decoder, layers
from jaxdpo.models.qwen2_5_vl.config import Qwen2TextConfig


class Attention(nnx.Module):
  """GQA self-attention: q/k/v with bias, o without, split-half (M-)RoPE."""

  def __init__(self, cfg: Qwen2TextConfig, *, rngs: nnx.Rngs, dtype, attention_impl):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    self.q = layers.Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), bias_shape=(n, h),
                           bias_axes=("heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.k = layers.Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), bias_shape=(k, h),
                           bias_axes=("kv_heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.v = layers.Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), bias_shape=(k, h),
                           bias_axes=("kv_heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.o = layers.Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), rngs=rngs, dtype=dtype)
    self.scale = h ** -0.5
    self.attention_impl = attention_impl

  @layers.scoped("attention")
  def __call__(self, x_BTD, cos_BTH, sin_BTH, attn, cache=None, cache_index=None):
    q_BTNH = layers.apply_rope(self.q(x_BTD), cos_BTH, sin_BTH)
    k_BTKH = layers.apply_rope(self.k(x_BTD), cos_BTH, sin_BTH)
    v_BTKH = self.v(x_BTD)
    new_cache = None
    if cache is not None:
      new_cache, k_BTKH, v_BTKH = layers.write_kv_cache(cache, k_BTKH, v_BTKH, cache_index)
    out_BTNH = layers.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, attn, scale=self.scale,
                                            implementation=self.attention_impl)
    return self.o(out_BTNH), new_cache


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: Qwen2TextConfig, *, rngs: nnx.Rngs, dtype, attention_impl):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
    self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act, rngs=rngs,
                               dtype=dtype)

  def __call__(self, x_BTD, cos_BTH, sin_BTH, attn, cache=None, cache_index=None):
    """`attn`: the `attention.Structure` of this call (a pytree, the same for every block)."""
    attn_BTD, new_cache = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, attn, cache,
                                         cache_index)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    return x_BTD, new_cache


class Qwen2Decoder(decoder.DecoderStack):
  """The Qwen2 decoder with its embedding and LM head.

  `__call__` returns the final (normed) hidden states so that log-probs can be computed in
  chunks against `unembedding()` without materialising [B, T, V] logits.
  """

  def __init__(self, cfg: Qwen2TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.init_stack(
        cfg, lambda _: DecoderBlock(cfg, rngs=rngs, dtype=param_dtype, attention_impl=attention_impl),
        lambda: layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=param_dtype),
        rngs=rngs, param_dtype=param_dtype)

  def embed(self, ids_BT):
    """Token embeddings [B, T, D] in the parameter dtype."""
    return jnp.take(self.embed_tokens[...], ids_BT, axis=0)

  def __call__(self, *, positions, segment_ids, input_ids=None, inputs_embeds=None, structure=None,
               kv_cache=None, cache_index=None):
    """Runs the decoder.

    Args:
      positions: int [B, T] (1D RoPE) or [3, B, T] (M-RoPE) rotary positions.
      segment_ids: int [B, T]; 0 marks padding. Gives the causal structure when `structure` is
        not given.
      input_ids: int [B, T]; exclusive with `inputs_embeds`.
      inputs_embeds: [B, T, D] (e.g. text embeddings with image features spliced in).
      structure: optional `attention.Structure` overriding the one of `segment_ids` (prefix-shared
        rows pass their branches; generation passes one that spans the cache).
      kv_cache: optional list of per-layer (k [B, S, K, H], v [B, S, K, H]).
      cache_index: int [B], where each row's keys/values of this call are written in the cache.

    Returns:
      (hidden [B, T, D] after the final norm, new kv cache or None).
    """
    x_BTD = decoder.embed_or_pass(self, input_ids, inputs_embeds)
    cos_BTH, sin_BTH = layers.rope_cos_sin(
        positions, layers.rope_inv_freq(self.config.head_size, self.config.rope_theta), self.config.mrope_section)
    if structure is None:
      structure = attention.self_attention(segment_ids)
    return self.run_blocks(x_BTD, lambda _: (cos_BTH, sin_BTH, structure), kv_cache, cache_index)

  # --------------------------------------------------------------------------------------------
  # Generation protocol (see `jaxdpo.generation.decode`): left-padded prompts, a preallocated KV cache.

  cache_batch_axis = {"next_positions": 1}  # see `decoder.DecoderStack.set_cache_rows`

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty cache for `max_len` slots.

    Layout: `kv` per-layer (k, v) [B, S, K, H]; `index` int32 [B] next slot to write in each
    row (rows advance together in a static batch; a refilled row restarts at 0); `segment_ids`
    int32 [B, S] of the written slots (0 = padding or not yet written, never attended);
    `next_positions` int32 [3, B] rotary position of the next token on each M-RoPE stream
    (1D RoPE reads stream 0; its batch axis is 1, see `cache_batch_axis`).
    """
    cfg = self.config
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_size)
    return {
        "kv": [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)],
        "index": jnp.zeros((batch_size,), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        "next_positions": jnp.zeros((3, batch_size), jnp.int32),
    }

  def extend(self, x_BTD, positions, segment_ids, cache: dict):
    """Runs T new tokens (embedded) against the cache, writing their keys and values.

    Args:
      x_BTD: input embeddings.
      positions: int [B, T] or [3, B, T] rotary positions of the new tokens.
      segment_ids: int [B, T]; 0 = padding.
      cache: from `init_cache` or a previous call.

    Returns:
      (hidden [B, T, D] after the final norm, updated cache). `next_positions` is left unchanged.
    """
    b, t = segment_ids.shape
    s = cache["segment_ids"].shape[1]
    index_B = cache["index"]
    kv_segments = layers.write_rows(cache["segment_ids"], segment_ids.astype(jnp.int32), index_B)
    q_index = index_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    st = attention.Structure(segment_ids, kv_segments, q_index, kv_index)
    h_BTD, kv = self(positions=positions, segment_ids=segment_ids, inputs_embeds=x_BTD, structure=st,
                     kv_cache=cache["kv"], cache_index=index_B)
    return h_BTD, dict(cache, kv=kv, index=index_B + t, segment_ids=kv_segments)

  def prefill_embeds(self, x_BTD, positions, segment_ids, cache: dict):
    """Prefill from embeddings (the VL model splices images in first); see `prefill`."""
    h_BTD, cache = self.extend(x_BTD, positions, segment_ids, cache)
    last = positions[..., -1]  # left padding: the last column is a real token in every row
    last_3B = jnp.broadcast_to(last, (3,) + last.shape[-1:]) if last.ndim == 1 else last
    cache["next_positions"] = (last_3B + 1).astype(jnp.int32)
    return self.logits(h_BTD[:, -1:])[:, 0].astype(jnp.float32), cache

  def prefill(self, inputs: dict, cache: dict):
    """Processes a left-padded prompt batch.

    Args:
      inputs: `input_ids`, `segment_ids` int [B, T]; optional `positions` ([B, T], or [3, B, T]
        for M-RoPE). Default positions count real tokens (`cumsum(segment_ids != 0) - 1`, 0 on
        padding), as transformers' `generate` derives them from the attention mask.
      cache: an empty cache from `init_cache`.

    Returns:
      (fp32 logits [B, V] at the last prompt position, cache).
    """
    segment_ids = inputs["segment_ids"]
    positions = inputs.get("positions")
    if positions is None:
      positions = text_positions(segment_ids)
    return self.prefill_embeds(self.embed(inputs["input_ids"]), positions, segment_ids, cache)

  def decode(self, tokens_B, cache: dict):
    """Appends one token per row; returns (fp32 logits [B, V], cache)."""
    # The new token joins the segment of the last written slot (the prompt's).
    last_B1 = jnp.clip(cache["index"] - 1, 0, cache["segment_ids"].shape[1] - 1)[:, None]
    segment_B1 = jnp.take_along_axis(cache["segment_ids"], last_B1, axis=1)
    pos_3B = cache["next_positions"]
    positions = pos_3B[:, :, None] if self.config.mrope_section is not None else pos_3B[0][:, None]
    h_B1D, cache = self.extend(self.embed(tokens_B[:, None]), positions, segment_B1, cache)
    cache["next_positions"] = pos_3B + 1
    return self.logits(h_B1D)[:, 0].astype(jnp.float32), cache


def text_positions(segment_ids):
  """1D positions counting real tokens of each row: `cumsum(segment_ids != 0) - 1`, 0 on padding."""
  real = (segment_ids != 0).astype(jnp.int32)
  return jnp.where(real > 0, jnp.cumsum(real, axis=1) - 1, 0)
