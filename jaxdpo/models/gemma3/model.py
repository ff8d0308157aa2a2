"""Flax nnx port of the Gemma 3 text decoder (`Gemma3TextModel` + tied LM head).

Held to transformers' `Gemma3ForCausalLM` and to the language model of
`Gemma3ForConditionalGeneration` (transformers 5.24.0) by the parity tests. What differs from
the Qwen2 decoder:
  * RMSNorm is `x̂ * (1 + w)` in fp32; four norms per block (input, post-attention,
    pre-feedforward, post-feedforward) and q/k norms over the head dim, before RoPE;
  * attention logits scaled by `query_pre_attn_scalar ** -0.5`;
  * two layer kinds: local (sliding window, RoPE theta 1e4) and global (full, theta 1e6 with
    linear scaling), as listed by `config.layer_types`;
  * embeddings multiplied by sqrt(D) rounded to the weight dtype; GELU (tanh) gated MLP.

Image tokens attend to each other bidirectionally within one image ("bidirectional groups",
see `image_groups`), composed as transformers does: global layers OR(causal, same image); local
layers AND(window, OR(causal, same image)); padding (segment 0) is never attended.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.models import attention, decoder, layers
from jaxdpo.models.gemma3.config import FULL, SLIDING, Gemma3TextConfig


def image_groups(is_image_BT):
  """Bidirectional group ids [B, T]: 1, 2, ... per run of consecutive image tokens, 0 elsewhere.

  transformers derives the same groups from `token_type_ids` (runs of 1s); the processor always
  separates images by boi/eoi tokens, so one run is one image.
  """
  is_image_BT = is_image_BT.astype(bool)
  prev_BT = jnp.pad(is_image_BT, ((0, 0), (1, 0)))[:, :-1]
  starts_BT = is_image_BT & ~prev_BT
  return jnp.where(is_image_BT, jnp.cumsum(starts_BT.astype(jnp.int32), axis=1), 0)


class Attention(nnx.Module):
  """GQA self-attention with q/k RMSNorm, per-layer-kind RoPE and optional sliding window."""

  def __init__(self, cfg: Gemma3TextConfig, layer_type: str, *, rngs: nnx.Rngs, dtype, attention_impl):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    def bias(*shape_axes):
      if not cfg.attention_bias:
        return {}
      return dict(bias_shape=tuple(s for s, _ in shape_axes), bias_axes=tuple(a for _, a in shape_axes))
    self.q = layers.Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype,
                           **bias((n, "heads"), (h, "head_dim")))
    self.k = layers.Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), rngs=rngs, dtype=dtype,
                           **bias((k, "kv_heads"), (h, "head_dim")))
    self.v = layers.Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), rngs=rngs, dtype=dtype,
                           **bias((k, "kv_heads"), (h, "head_dim")))
    self.o = layers.Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), rngs=rngs, dtype=dtype,
                           **bias((d, "embed")))
    self.q_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, plus_one=True, rngs=rngs, dtype=dtype)
    self.k_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, plus_one=True, rngs=rngs, dtype=dtype)
    self.layer_type = layer_type
    self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
    self.attention_impl = attention_impl

  @layers.scoped("attention")
  def __call__(self, x_BTD, cos_BTH, sin_BTH, attn, cache=None, cache_index=None):
    q_BTNH = layers.apply_rope(self.q_norm(self.q(x_BTD)), cos_BTH, sin_BTH)
    k_BTKH = layers.apply_rope(self.k_norm(self.k(x_BTD)), cos_BTH, sin_BTH)
    v_BTKH = self.v(x_BTD)
    new_cache = None
    if cache is not None and self.layer_type == SLIDING:
      # Ring buffer of the last W slots: attend over [ring as it was, this call's keys] (the mask
      # knows each entry's slot), then keep the newest W of them, slot a at a % W.
      ring_k, ring_v = cache
      t, w = k_BTKH.shape[1], ring_k.shape[1]
      n = min(t, w)
      at_Bn = (cache_index[:, None] + t - n + jnp.arange(n)[None, :]) % w  # per row: rows advance independently
      rows_B1 = jnp.arange(k_BTKH.shape[0])[:, None]
      new_cache = (ring_k.at[rows_B1, at_Bn].set(k_BTKH[:, t - n:].astype(ring_k.dtype)),
                   ring_v.at[rows_B1, at_Bn].set(v_BTKH[:, t - n:].astype(ring_v.dtype)))
      k_BTKH = jnp.concatenate([ring_k.astype(q_BTNH.dtype), k_BTKH], axis=1)
      v_BTKH = jnp.concatenate([ring_v.astype(q_BTNH.dtype), v_BTKH], axis=1)
    elif cache is not None:
      # Global layers: attend over the whole cache; the mask decides which slots count.
      new_cache, k_BTKH, v_BTKH = layers.write_kv_cache(cache, k_BTKH, v_BTKH, cache_index)
    out_BTNH = layers.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, attn, scale=self.scale,
                                            implementation=self.attention_impl)
    return self.o(out_BTNH), new_cache


class DecoderBlock(nnx.Module):
  """x + post_attn_norm(attn(input_norm(x))); then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

  def __init__(self, cfg: Gemma3TextConfig, layer_type: str, *, rngs: nnx.Rngs, dtype, attention_impl):
    def norm():
      return layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=True, rngs=rngs, dtype=dtype)
    self.input_layernorm = norm()
    self.self_attn = Attention(cfg, layer_type, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm()
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act, rngs=rngs,
                               dtype=dtype)
    self.post_feedforward_layernorm = norm()

  def __call__(self, x_BTD, cos_BTH, sin_BTH, attn, cache=None, cache_index=None):
    """`attn`: the `attention.Structure` of this block's layer kind (a pytree)."""
    attn_BTD, new_cache = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, attn, cache,
                                         cache_index)
    x_BTD = x_BTD + self.post_attention_layernorm(attn_BTD)
    x_BTD = x_BTD + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_BTD)))
    return x_BTD, new_cache


class Gemma3TextModel(decoder.DecoderStack):
  """The Gemma 3 decoder with its (scaled) embedding and LM head.

  `__call__` returns the final (normed) hidden states so that log-probs can be computed in
  chunks against `unembedding()` without materialising [B, T, V] logits. When
  `logit_softcap` is not None, `logits` applies `c * tanh(x / c)` and chunked log-prob code
  must do the same (no Gemma 3 checkpoint sets it).
  """

  def __init__(self, cfg: Gemma3TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.init_stack(
        cfg, lambda i: DecoderBlock(cfg, cfg.layer_types[i], rngs=rngs, dtype=param_dtype,
                                    attention_impl=attention_impl),
        lambda: layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=True, rngs=rngs, dtype=param_dtype),
        rngs=rngs, param_dtype=param_dtype)
    self.logit_softcap = cfg.final_logit_softcapping

  # ------------------------------------------------------------------------------------------
  # Embedding and head

  def embed(self, ids_BT):
    """Token embeddings [B, T, D] times sqrt(D), the factor rounded to the weight dtype first."""
    table = self.embed_tokens[...]
    # transformers keeps sqrt(D) as an fp32 tensor and casts it to the weight dtype (bf16 turns
    # sqrt(2560) = 50.596 into 50.5); we round the same way, through fp32.
    scale = jnp.asarray(np.float32(self.config.hidden_size ** 0.5)).astype(table.dtype)
    return jnp.take(table, ids_BT, axis=0) * scale

  # ------------------------------------------------------------------------------------------
  # Forward

  def rope_tables(self, positions_BT):
    """(cos, sin) per layer kind, fp32 [B, T, H]."""
    cfg = self.config
    inv_freq = {
        FULL: layers.rope_inv_freq(cfg.head_dim, cfg.rope_global_theta, cfg.rope_global_linear_factor),
        SLIDING: layers.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, cfg.rope_local_linear_factor),
    }
    return {kind: layers.rope_cos_sin(positions_BT, inv) for kind, inv in inv_freq.items()}

  def masks(self, q_segment_ids, kv_segment_ids, q_index=None, kv_index=None, groups_q=None, groups_kv=None):
    """Attention structures (`attention.Structure`, layout ANY) for both layer kinds."""
    full = attention.Structure(q_segment_ids, kv_segment_ids, q_index, kv_index, groups_q, groups_kv)
    return self.kind_structures(full)

  def kind_structures(self, full: attention.Structure) -> dict:
    """{layer kind: structure}: global layers take `full`, local ones add the sliding window."""
    return {FULL: full, SLIDING: full.windowed(self.config.sliding_window)}

  def __call__(self, *, positions, segment_ids, input_ids=None, inputs_embeds=None, image_groups_BT=None,
               structure=None, masks=None, kv_cache=None, cache_index=None):
    """Runs the decoder.

    Args:
      positions: int [B, T] rotary positions.
      segment_ids: int [B, T]; 0 marks padding, equal non-zero ids may attend (packing).
      input_ids: int [B, T]; exclusive with `inputs_embeds`.
      inputs_embeds: [B, T, D], already scaled (e.g. from `embed`, with image features spliced).
      image_groups_BT: optional int [B, T] bidirectional groups (see `image_groups`).
      structure: optional `attention.Structure` of the global layers, without groups (prefix-shared
        rows pass their branches); default: the causal structure of `segment_ids`.
      masks: optional {layer kind: `attention.Structure`} overriding both (generation passes
        structures that span the cache).
      kv_cache: optional list of per-layer (k, v): [B, S, K, H] on global layers, a ring buffer
        [B, W', K, H] on local layers (see the generation protocol below).
      cache_index: int [B], the cache slot of each row's first token in this call.

    Returns:
      (hidden [B, T, D] after the final norm, new kv cache or None).
    """
    x_BTD = decoder.embed_or_pass(self, input_ids, inputs_embeds)
    rope = self.rope_tables(positions)
    if masks is None:
      full = attention.self_attention(segment_ids) if structure is None else structure
      if image_groups_BT is not None:
        full = dataclasses.replace(full, q_groups=image_groups_BT, kv_groups=image_groups_BT)
      masks = self.kind_structures(full)
    def block_inputs(block):
      kind = block.self_attn.layer_type
      return (*rope[kind], masks[kind])
    return self.run_blocks(x_BTD, block_inputs, kv_cache, cache_index)

  # ------------------------------------------------------------------------------------------
  # Generation protocol (driven by `jaxdpo.generation.decode`). The cache is a plain dict:
  #   kv            list over layers of (k, v): [B, S, K, H] for global layers; for local
  #                 layers a ring buffer [B, W', K, H] of the last W' = min(window, S) slots,
  #                 slot a stored at a % W' (transformers keeps the last window-1 slots plus
  #                 the new one: the same keys, so decoding stays exact past the window)
  #   index         int32 [B], the next cache slot to write in each row (rows advance together
  #                 in a static batch; a row refilled with a new prompt restarts at 0)
  #   segment_ids   int32 [B, S], 1 for slots holding real tokens, 0 for padding / unwritten
  #   next_position int32 [B], the rotary position of the next token of each row

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + new)."""
    cfg = self.config
    ring = min(cfg.sliding_window, max_len)
    def zeros(kind):
      shape = (batch_size, max_len if kind == FULL else ring, cfg.num_kv_heads, cfg.head_dim)
      return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return {
        "kv": [zeros(kind) for kind in cfg.layer_types],
        "index": jnp.zeros((batch_size,), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
        "next_position": jnp.zeros((batch_size,), jnp.int32),
    }

  def cached_forward(self, *, positions, segment_ids, cache: dict, input_ids=None, inputs_embeds=None,
                     image_groups_BT=None):
    """Runs T new tokens per row against the cache and appends their keys/values.

    The new tokens occupy slots [index, index + T). They see earlier real slots (within the
    window on local layers) and, causally or within their image, each other. Causality and
    windows follow cache slots, as transformers' do (left padding included).

    Returns:
      (hidden [B, T, D] after the final norm, updated cache; `next_position` is left to the
      caller).
    """
    seg_BT = (segment_ids != 0).astype(jnp.int32)
    b, t = seg_BT.shape
    index_B = cache["index"]
    old_seg_BS = cache["segment_ids"]
    s = old_seg_BS.shape[1]
    kv_seg_BS = layers.write_rows(old_seg_BS, seg_BT, index_B)
    q_index_BT = index_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    # Padded queries get segment 1 so that their (unused) rows are not all masked.
    q_seg_BT = jnp.ones_like(seg_BT)
    groups_q = groups_kv = groups_ring = None
    if image_groups_BT is not None:
      groups_q = image_groups_BT.astype(jnp.int32)
      groups_kv = layers.write_rows(jnp.zeros((b, s), jnp.int32), groups_q, index_B)
      groups_ring = jnp.concatenate([jnp.zeros((b, min(self.config.sliding_window, s)), jnp.int32), groups_q], 1)
    # Global layers: the whole cache.
    kv_index_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    full = attention.Structure(q_seg_BT, kv_seg_BS, q_index_BT, kv_index_BS, groups_q, groups_kv)
    # Local layers: the ring as it was, then this call's tokens. Ring slot j holds the newest
    # slot a < index with a % W' == j (none yet when a < 0).
    w = min(self.config.sliding_window, s)
    j_W = jnp.arange(w, dtype=jnp.int32)
    ring_index_BW = j_W[None, :] + w * ((index_B[:, None] - 1 - j_W[None, :]) // w)
    ring_seg_BW = jnp.where(ring_index_BW >= 0,
                            jnp.take_along_axis(old_seg_BS, jnp.clip(ring_index_BW, 0, s - 1), axis=1), 0)
    local_index_BS = jnp.concatenate([ring_index_BW, q_index_BT], axis=1)
    local = attention.Structure(q_seg_BT, jnp.concatenate([ring_seg_BW, seg_BT], axis=1), q_index_BT, local_index_BS,
                                groups_q, groups_ring, sliding_window=self.config.sliding_window)
    h_BTD, kv = self(positions=positions, segment_ids=seg_BT, input_ids=input_ids, inputs_embeds=inputs_embeds,
                     masks={FULL: full, SLIDING: local}, kv_cache=cache["kv"], cache_index=index_B)
    return h_BTD, dict(cache, kv=kv, index=index_B + t, segment_ids=kv_seg_BS)

  def prefill_embeds(self, inputs_embeds, segment_ids, cache: dict, image_groups_BT=None):
    """Prefill from ready embeddings (shared by the text and the multimodal model)."""
    seg_BT = (segment_ids != 0).astype(jnp.int32)
    # Positions count real tokens only, as transformers derives them from the attention mask.
    positions_BT = jnp.maximum(jnp.cumsum(seg_BT, axis=1) - 1, 0)
    h_BTD, cache = self.cached_forward(positions=positions_BT, segment_ids=seg_BT, cache=cache,
                                       inputs_embeds=inputs_embeds, image_groups_BT=image_groups_BT)
    cache["next_position"] = positions_BT[:, -1] + 1
    return self.logits(h_BTD[:, -1:])[:, 0].astype(jnp.float32), cache

  def prefill(self, inputs: dict, cache: dict):
    """Runs a left-padded prompt (`input_ids`, `segment_ids` int [B, T]) into an empty cache.

    Returns:
      (fp32 logits [B, V] at the last prompt position, cache).
    """
    return self.prefill_embeds(self.embed(inputs["input_ids"]), inputs["segment_ids"], cache)

  def decode(self, tokens_B, cache: dict):
    """Feeds one token per row; returns (fp32 logits [B, V] for the next token, cache)."""
    positions_BT = cache["next_position"][:, None]
    h_BTD, cache = self.cached_forward(positions=positions_BT, segment_ids=jnp.ones_like(positions_BT),
                                       cache=cache, input_ids=tokens_B[:, None])
    cache["next_position"] = cache["next_position"] + 1
    return self.logits(h_BTD)[:, 0].astype(jnp.float32), cache
