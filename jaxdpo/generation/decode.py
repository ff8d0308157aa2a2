"""Batched autoregressive generation: prefill, then a KV-cache decode loop inside one `jit`.

Any model that implements the generation protocol works here (see each family's model):

  init_cache(batch_size, max_len, dtype) -> cache           (a plain pytree)
  prefill(inputs, cache) -> (logits [B, V] fp32, cache)      logits at the last prompt position
  decode(tokens [B], cache) -> (logits [B, V] fp32, cache)   one new token per row

Prompts are LEFT-padded: `inputs["input_ids"]`, `inputs["segment_ids"]` (1 real, 0 pad) int
[B, T], plus any family-specific keys (images), which are passed through to `prefill`
untouched.

Semantics match transformers' `generate` with left padding:
  * Greedy decoding when `temperature == 0`; otherwise `logits / temperature`, then top-k, then
    top-p (nucleus) filtering, then a categorical draw. The PRNG key is split once per step,
    so one key gives one reproducible output.
  * A row stops at its first EOS (any of `eos_token_id`). The EOS token is kept in the output
    and COUNTED in `num_generated`; afterwards the row emits `pad_token_id`. Finished rows keep
    running through the model (the batch moves together) but their outputs are discarded.
  * The loop is a `lax.while_loop` that exits as soon as every row has finished, so a batch
    that stops early does not pay for `max_new_tokens` steps.
  * `vocab_limit`: ids >= it are never chosen (their logits are masked before greedy or sampled
    selection). A model's embedding table is often larger than its tokenizer (padded to a round
    size); the unused rows have no text, and a sample that picks one is garbage that no check
    downstream can read.

Compilation: the whole generation (cache allocation, prefill and loop) is one jitted
function, `_generate_jit`. The model enters it as (graphdef, state) with the graphdef static,
so new weights of the same shapes reuse the compiled program. It compiles once per
(graphdef, input shapes, max_new_tokens, decoding mode, top_k, cache dtype); temperature,
top_p, eos and pad ids and vocab_limit are traced values and never trigger a recompile. `compile_count()`
reports how many programs are cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class GenerationOutput(NamedTuple):
  """What `generate` returns (all device arrays).

  Attributes:
    tokens: int32 [B, max_new_tokens]; new tokens only, EOS included, `pad_token_id` after it.
    num_generated: int32 [B]; tokens emitted before padding, counting the EOS token. A row that
      stopped at step i (0-based) has i + 1; a row that hit the limit has max_new_tokens.
    hit_limit: bool [B]; True when the row emitted no EOS within max_new_tokens.
    steps: int32 scalar; token columns produced (the prefill's token plus one per decode step);
      less than max_new_tokens when every row stopped early.
  """

  tokens: jax.Array
  num_generated: jax.Array
  hit_limit: jax.Array
  steps: jax.Array


def generate(model: nnx.Module, inputs: dict, *, max_new_tokens: int, eos_token_id: int | Sequence[int],
             pad_token_id: int, rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, cache_dtype=None, vocab_limit: int | None = None) -> GenerationOutput:
  """Generates up to `max_new_tokens` tokens for each row of a left-padded batch.

  Args:
    model: an nnx module implementing `init_cache` / `prefill` / `decode`.
    inputs: dict with `input_ids` and `segment_ids` (int [B, T], left-padded) and any
      family-specific keys.
    max_new_tokens: the token budget per row (>= 1); fixes the output shape.
    eos_token_id: one id or a list of ids that end a row.
    pad_token_id: emitted by rows that have finished.
    rng: PRNG key (typed `jax.random.key` or raw `PRNGKey`); required when sampling.
    temperature: 0 for greedy decoding; > 0 to sample from softmax(logits / temperature).
    top_p: nucleus mass in (0, 1]; 1 disables it. Sampling only.
    top_k: keep the k most likely tokens; 0 disables it. Sampling only.
    cache_dtype: dtype of the KV cache; default the dtype of the model's first floating
      parameter.
    vocab_limit: only ids below it can be emitted (pass `len(tokenizer)`); None = every row of
      the model's vocabulary.

  Returns:
    A `GenerationOutput`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  if vocab_limit is not None and vocab_limit < 1:
    raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
  for key in ("input_ids", "segment_ids"):
    if key not in inputs:
      raise ValueError(f"inputs lack {key!r}; got keys {sorted(inputs)}")
  greedy = temperature == 0.0
  if rng is None:
    if not greedy:
      raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    rng = jax.random.key(0)  # unused by greedy decoding; keeps the traced signature fixed
  eos_ids = np.atleast_1d(np.asarray(eos_token_id, np.int32))
  if eos_ids.ndim != 1 or eos_ids.size == 0:
    raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")

  graphdef, state = nnx.split(model)
  if cache_dtype is None:
    cache_dtype = _first_float_dtype(state)
  inputs = {k: (jnp.asarray(v, jnp.int32) if k in ("input_ids", "segment_ids") else v) for k, v in inputs.items()}
  return _generate_jit(graphdef, state, inputs, rng, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                       jnp.asarray(eos_ids), jnp.int32(pad_token_id),
                       jnp.int32(np.iinfo(np.int32).max if vocab_limit is None else vocab_limit),
                       max_new_tokens=max_new_tokens,
                       greedy=greedy, top_k=int(top_k), use_top_p=top_p < 1.0,
                       cache_dtype=jnp.dtype(cache_dtype))


def compile_count() -> int:
  """Number of generation programs compiled (and cached) so far in this process."""
  return _generate_jit._cache_size()  # pylint: disable=protected-access


def _first_float_dtype(state) -> jnp.dtype:
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.dtype
  return jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p",
                                             "cache_dtype"))
def _generate_jit(graphdef, state, inputs, rng, temperature, top_p, eos_ids_E, pad_id, vocab_limit, *,
                  max_new_tokens, greedy, top_k, use_top_p, cache_dtype):
  model = nnx.merge(graphdef, state)
  b, t = inputs["input_ids"].shape
  cache = model.init_cache(b, t + max_new_tokens, cache_dtype)
  logits_BV, cache = model.prefill(inputs, cache)

  def choose(logits_BV, key):
    # Rows past the tokenizer get -inf before any filtering, so top-k/top-p see only real tokens.
    allowed_V = jnp.arange(logits_BV.shape[-1]) < vocab_limit
    logits_BV = jnp.where(allowed_V[None, :], logits_BV.astype(jnp.float32), -jnp.inf)
    return _select_tokens(logits_BV, key, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

  # The first token comes from the prefill logits; the loop then alternates decode -> choose,
  # so no forward pass is spent on a token that is never used.
  rng, key = jax.random.split(rng)
  first_B = choose(logits_BV, key)
  tokens_BN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  done_B = jnp.isin(first_B, eos_ids_E)
  num_B = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, done_B, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    step, prev_B, cache, tokens_BN, done_B, num_B, rng = carry
    logits_BV, cache = model.decode(prev_B, cache)
    rng, key = jax.random.split(rng)
    next_B = jnp.where(done_B, pad_id, choose(logits_BV, key))
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, next_B[:, None], step, axis=1)
    num_B = num_B + (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.isin(next_B, eos_ids_E)
    return step + 1, next_B, cache, tokens_BN, done_B, num_B, rng

  carry = (jnp.int32(1), first_B, cache, tokens_BN, done_B, num_B, rng)
  steps, _, _, tokens_BN, done_B, num_B, _ = jax.lax.while_loop(cond, body, carry)
  # `done` only flips on an EOS from an active row, so it is exactly "emitted an EOS".
  return GenerationOutput(tokens=tokens_BN, num_generated=num_B, hit_limit=~done_B, steps=steps)


def _select_tokens(logits_BV, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
  """Greedy argmax, or a draw after temperature, top-k and top-p filtering (HF's order)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if use_top_p:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token when the mass strictly above it is below top_p; the top token always stays.
    mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = mass_above_BV < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
