"""Batched autoregressive generation: prefill, then a KV-cache decode loop inside one `jit`.

Any model that implements the generation protocol works here (see each family's model):

  init_cache(batch_size, max_len, dtype) -> cache           (a plain pytree)
  prefill(inputs, cache) -> (logits [B, V] fp32, cache)      logits at the last prompt position
  decode(tokens [B], cache) -> (logits [B, V] fp32, cache)   one new token per row
  set_cache_rows(cache, rows [R], new) -> cache              rows replaced by a fresh R-row cache

The cache keeps one write index per row, so rows need not advance together (row refill below).

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

Two drivers share these semantics:
  * `generate`: one static batch; rows that finish early wait for the slowest one.
  * `generate_refill`: continuous batching over the same static cache: a finished row takes the
    next prompt (prefilled R at a time and moved into the free rows), so no row waits on a loop.
    Greedy outputs per prompt are those of `generate`.
  * `stop_on_loop` (both): the degeneration detector runs inside the loop
    (`degeneration.track_token` / `loops_now`, equal to `degeneration.detect` on every prefix);
    a row whose tail is a confirmed exact loop stops (`stopped_on_loop`), with its tokens so far.

Compilation: the whole static generation (cache allocation, prefill and loop) is one jitted
function, `_generate_jit`. The model enters it as (graphdef, state) with the graphdef static,
so new weights of the same shapes reuse the compiled program. It compiles once per
(graphdef, input shapes, max_new_tokens, decoding mode, top_k, cache dtype); temperature,
top_p, eos and pad ids and vocab_limit are traced values and never trigger a recompile. `compile_count()`
reports how many programs are cached.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.generation import degeneration


class GenerationOutput(NamedTuple):
  """What `generate` returns (all device arrays).

  Attributes:
    tokens: int32 [B, max_new_tokens]; new tokens only, EOS included, `pad_token_id` after it.
    num_generated: int32 [B]; tokens emitted before padding, counting the EOS token. A row that
      stopped at step i (0-based) has i + 1; a row that hit the limit has max_new_tokens.
    hit_limit: bool [B]; True when the row emitted no EOS within max_new_tokens (and was not
      stopped on a loop).
    steps: int32 scalar; token columns produced (the prefill's token plus one per decode step);
      less than max_new_tokens when every row stopped early.
    stopped_on_loop: bool [B]; the row was cut short by `stop_on_loop` (its tail is a confirmed
      exact loop); its tokens are the output so far. All False without `stop_on_loop`.
  """

  tokens: jax.Array
  num_generated: jax.Array
  hit_limit: jax.Array
  steps: jax.Array
  stopped_on_loop: jax.Array | None = None


def generate(model: nnx.Module, inputs: dict, *, max_new_tokens: int, eos_token_id: int | Sequence[int],
             pad_token_id: int, rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, cache_dtype=None, vocab_limit: int | None = None,
             stop_on_loop: degeneration.DegenerationConfig | None = None,
             stop_min_run: int | None = None) -> GenerationOutput:
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
    stop_on_loop: the degeneration detector's thresholds to stop rows whose tail is a confirmed
      exact loop (`degeneration.confirm_run`); None = every row runs to EOS or the limit.
    stop_min_run: tokens the loop must cover before the row is cut (`degeneration.confirm_run`);
      None = `degeneration.default_min_run`. Only used with `stop_on_loop`.

  Returns:
    A `GenerationOutput`.
  """
  _validate(max_new_tokens, temperature, top_p, top_k, vocab_limit)
  for key in ("input_ids", "segment_ids"):
    if key not in inputs:
      raise ValueError(f"inputs lack {key!r}; got keys {sorted(inputs)}")
  greedy = temperature == 0.0
  if rng is None:
    if not greedy:
      raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    rng = jax.random.key(0)  # unused by greedy decoding; keeps the traced signature fixed
  eos_ids = _eos_array(eos_token_id)

  graphdef, state = nnx.split(model)
  if cache_dtype is None:
    cache_dtype = _first_float_dtype(state)
  inputs = {k: (jnp.asarray(v, jnp.int32) if k in ("input_ids", "segment_ids") else v) for k, v in inputs.items()}
  return _generate_jit(graphdef, state, inputs, rng, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                       jnp.asarray(eos_ids), jnp.int32(pad_token_id),
                       jnp.int32(np.iinfo(np.int32).max if vocab_limit is None else vocab_limit),
                       max_new_tokens=max_new_tokens,
                       greedy=greedy, top_k=int(top_k), use_top_p=top_p < 1.0,
                       cache_dtype=jnp.dtype(cache_dtype), loop=stop_on_loop,
                       confirm=_confirm(stop_on_loop, max_new_tokens, stop_min_run))


def compile_count() -> int:
  """Number of generation programs compiled (and cached) so far in this process (both drivers)."""
  return sum(f._cache_size() for f in (_generate_jit, _empty_rows, _refill_rows, _decode_until))  # pylint: disable=protected-access


def _confirm(loop, max_new_tokens: int, min_run: int | None) -> int:
  """The loop length that cuts a row (a static int: 0 without `stop_on_loop`)."""
  return 0 if loop is None else degeneration.confirm_run(loop, max_new_tokens, min_run)


def _eos_array(eos_token_id) -> np.ndarray:
  eos_ids = np.atleast_1d(np.asarray(eos_token_id, np.int32))
  if eos_ids.ndim != 1 or eos_ids.size == 0:
    raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
  return eos_ids


def _validate(max_new_tokens, temperature, top_p, top_k, vocab_limit):
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


def _first_float_dtype(state) -> jnp.dtype:
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.dtype
  return jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p",
                                             "cache_dtype", "loop", "confirm"))
def _generate_jit(graphdef, state, inputs, rng, temperature, top_p, eos_ids_E, pad_id, vocab_limit, *,
                  max_new_tokens, greedy, top_k, use_top_p, cache_dtype, loop, confirm):
  model = nnx.merge(graphdef, state)
  b, t = inputs["input_ids"].shape
  cache = model.init_cache(b, t + max_new_tokens, cache_dtype)
  logits_BV, cache = model.prefill(inputs, cache)

  def choose(logits_BV, key):
    return _select_tokens(_mask_vocab(logits_BV, vocab_limit), key, temperature, top_p, greedy=greedy, top_k=top_k,
                          use_top_p=use_top_p)

  # The first token comes from the prefill logits; the loop then alternates decode -> choose,
  # so no forward pass is spent on a token that is never used.
  rng, key = jax.random.split(rng)
  first_B = choose(logits_BV, key)
  tokens_BN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  eos_B = jnp.isin(first_B, eos_ids_E)
  num_B = jnp.ones((b,), jnp.int32)
  tracker = _LoopTracker(loop, max_new_tokens, confirm)
  matches_BP = tracker.init(b)  # one token so far: nothing to match yet
  cut_B = jnp.zeros((b,), bool)

  def cond(carry):
    step, _, _, _, eos_B, cut_B, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(eos_B | cut_B)

  def body(carry):
    step, prev_B, cache, tokens_BN, eos_B, cut_B, num_B, matches_BP, rng = carry
    logits_BV, cache = model.decode(prev_B, cache)
    rng, key = jax.random.split(rng)
    active_B = ~(eos_B | cut_B)
    next_B = jnp.where(active_B, choose(logits_BV, key), pad_id)
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, next_B[:, None], step, axis=1)
    num_B = num_B + active_B.astype(jnp.int32)
    new_eos_B = active_B & jnp.isin(next_B, eos_ids_E)
    matches_BP, new_cut_B = tracker.update(matches_BP, tokens_BN, next_B, num_B, active_B & ~new_eos_B)
    return step + 1, next_B, cache, tokens_BN, eos_B | new_eos_B, cut_B | new_cut_B, num_B, matches_BP, rng

  carry = (jnp.int32(1), first_B, cache, tokens_BN, eos_B, cut_B, num_B, matches_BP, rng)
  steps, _, _, tokens_BN, eos_B, cut_B, num_B, _, _ = jax.lax.while_loop(cond, body, carry)
  # `eos` only flips on an EOS from an active row, so it is exactly "emitted an EOS".
  return GenerationOutput(tokens=tokens_BN, num_generated=num_B, hit_limit=~(eos_B | cut_B), steps=steps,
                          stopped_on_loop=cut_B)


def _mask_vocab(logits_BV, vocab_limit):
  # Rows past the tokenizer get -inf before any filtering, so top-k/top-p see only real tokens.
  allowed_V = jnp.arange(logits_BV.shape[-1]) < vocab_limit
  return jnp.where(allowed_V[None, :], logits_BV.astype(jnp.float32), -jnp.inf)


class _LoopTracker:
  """`stop_on_loop` inside the decode loop: the in-loop detector of `degeneration` plus the
  stopping rule (the confirmed loop covers `confirm` = `degeneration.confirm_run` tokens, before
  the limit). With `cfg=None` it tracks nothing and never stops a row (its state is an empty
  [B, 0] array)."""

  def __init__(self, cfg: degeneration.DegenerationConfig | None, max_new_tokens: int, confirm: int = 0):
    self.cfg = cfg
    self.max_new_tokens = max_new_tokens
    self.confirm = confirm
    if cfg is not None:
      self.periods_P = jnp.asarray(degeneration.loop_periods(cfg))
      self.need_W = jnp.asarray(degeneration.coverage_need(cfg))

  def init(self, b: int):
    return jnp.zeros((b, 0 if self.cfg is None else self.periods_P.shape[0]), jnp.int32)

  def update(self, matches_BP, tokens_BN, new_B, num_B, active_B):
    """After `new_B` became token num_B - 1 of each active row: (counts, rows to stop now)."""
    if self.cfg is None:
      return matches_BP, jnp.zeros(num_B.shape, bool)
    matches_BP = degeneration.track_token(matches_BP, tokens_BN, new_B, num_B - 1, active_B, self.periods_P)
    loops_B, _, run_B = degeneration.loops_now(matches_BP, num_B, self.periods_P, self.need_W, self.cfg)
    # A loop that reaches the limit is the full-length definition's business (hit_limit), not a cut.
    return matches_BP, active_B & loops_B & (run_B >= self.confirm) & (num_B < self.max_new_tokens)


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


# ------------------------------------------------------------------------------------------------
# Continuous batching ("row refill"): B rows over one static KV cache; a row that finishes (EOS,
# the limit, or a loop cut short) takes the next prompt. The cache keeps one write index per row,
# so a refilled row is laid out exactly as it would be in a fresh static batch (prompt in slots
# [0, T), new tokens from T on): its greedy output does not depend on what shares the batch.
#
# Three programs, whatever the number of prompts: `_empty_rows` (B rows, all free), `_refill_rows`
# (prefills R prompts into a fresh R-row cache and moves them into R free rows) and
# `_decode_until` (decodes until at least `want_free` rows are free). The host loop between them
# only moves row bookkeeping (a few ints per row) and the finished rows' tokens.


class RefillOutput(NamedTuple):
  """What `generate_refill` returns (numpy, one entry per prompt, in prompt order).

  Attributes:
    tokens: int32 [P, max_new_tokens]; as `GenerationOutput.tokens`.
    num_generated, hit_limit, stopped_on_loop: [P]; as in `GenerationOutput`.
    slot_seconds: float64 [P]; wall time the prompt held its row, divided by the number of rows
      (each prompt's share of the machine; they add up to about the wall time of the run).
    stats: {"decode_calls", "refills", "decode_steps"}: host round trips, prefill calls, and
      model steps over the whole batch.
  """

  tokens: np.ndarray
  num_generated: np.ndarray
  hit_limit: np.ndarray
  stopped_on_loop: np.ndarray
  slot_seconds: np.ndarray
  stats: dict


def generate_refill(model: nnx.Module, num_prompts: int, make_inputs, *, batch_size: int, prompt_length: int,
                    max_new_tokens: int, eos_token_id: int | Sequence[int], pad_token_id: int,
                    rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    cache_dtype=None, vocab_limit: int | None = None,
                    stop_on_loop: degeneration.DegenerationConfig | None = None, stop_min_run: int | None = None,
                    refill_rows: int | None = None, on_finished=None) -> RefillOutput:
  """Generates for `num_prompts` prompts with `batch_size` rows, refilling rows as they finish.

  Greedy outputs per prompt equal `generate` on any static batch holding that prompt (same
  prompt length): the tests hold the three families to it. Sampling draws from the same
  distribution, but with one key per prompt (`fold_in(rng, prompt id)`, then the token index)
  instead of one per batch step, so a prompt's sample does not depend on its batch.

  Args:
    model: an nnx module implementing `init_cache` / `prefill` / `decode` / `set_cache_rows`.
    num_prompts: P, the number of prompts.
    make_inputs: list of R prompt ids -> the left-padded `generate` inputs of those prompts
      (R rows, `prompt_length` columns, the family's keys).
    batch_size: B, rows decoded together.
    prompt_length: T, the prompts' padded length (fixes the cache: T + max_new_tokens slots).
    max_new_tokens, eos_token_id, pad_token_id, temperature, top_p, top_k, cache_dtype,
      vocab_limit, stop_on_loop, stop_min_run: as in `generate`.
    rng: PRNG key; required when sampling.
    refill_rows: R, prompts prefilled per refill (a fixed shape: one compile); default B / 4,
      at least 1. Rows wait until R are free, so a small R keeps rows busy and a large one
      prefills in bigger pieces.
    on_finished: optional callable, given the number of prompts that just finished (progress).

  Returns:
    A `RefillOutput`.
  """
  _validate(max_new_tokens, temperature, top_p, top_k, vocab_limit)
  if num_prompts < 1 or batch_size < 1:
    raise ValueError(f"need num_prompts >= 1 and batch_size >= 1, got {num_prompts}, {batch_size}")
  r = refill_rows or max(1, batch_size // 4)
  if not 1 <= r <= batch_size:
    raise ValueError(f"refill_rows must be in [1, batch_size={batch_size}], got {r}")
  greedy = temperature == 0.0
  if rng is None:
    if not greedy:
      raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    rng = jax.random.key(0)
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  graphdef, state = nnx.split(model)
  cache_dtype = jnp.dtype(cache_dtype or _first_float_dtype(state))
  static = dict(max_new_tokens=max_new_tokens)
  confirm = _confirm(stop_on_loop, max_new_tokens, stop_min_run)
  choice = dict(greedy=greedy, top_k=int(top_k), use_top_p=top_p < 1.0)
  traced = (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.asarray(_eos_array(eos_token_id)),
            jnp.int32(pad_token_id), jnp.int32(np.iinfo(np.int32).max if vocab_limit is None else vocab_limit))

  rows = _empty_rows(graphdef, state, rng, batch_size=batch_size, max_len=prompt_length + max_new_tokens,
                     max_new_tokens=max_new_tokens, cache_dtype=cache_dtype, loop=stop_on_loop)
  # Constant outputs come back uncommitted, the later programs' committed: commit them once so that
  # the first refill does not compile a second copy of `_refill_rows`.
  place = _replicated_like(state)
  if place is not None:
    rows = jax.device_put(rows, jax.tree.map(lambda _: place, rows))
  out_tokens = np.full((num_prompts, max_new_tokens), pad_token_id, np.int32)
  out_num = np.zeros(num_prompts, np.int32)
  out_hit = np.zeros(num_prompts, bool)
  out_cut = np.zeros(num_prompts, bool)
  out_seconds = np.zeros(num_prompts)
  owner = np.full(batch_size, -1)          # prompt id held by each row; -1 = free
  started = np.zeros(batch_size)
  pending = list(range(num_prompts))[::-1]  # pop() takes the next prompt
  stats = {"decode_calls": 0, "refills": 0, "decode_steps": 0}
  while True:
    free = np.flatnonzero(owner < 0)
    while pending and free.size >= min(r, len(pending)):
      take = [pending.pop() for _ in range(min(r, len(pending)))]
      slots = free[:len(take)]
      pad_rows = r - len(take)  # a short last refill: copies of a prompt, aimed at no row
      inputs = make_inputs(take + take[-1:] * pad_rows)
      inputs = {k: (jnp.asarray(v, jnp.int32) if k in ("input_ids", "segment_ids") else v) for k, v in inputs.items()}
      if inputs["input_ids"].shape != (r, prompt_length):
        raise ValueError(f"make_inputs gave input_ids {inputs['input_ids'].shape}, expected {(r, prompt_length)}")
      slot_ids = np.concatenate([slots, np.full(pad_rows, batch_size)]).astype(np.int32)
      job_ids = np.asarray(take + take[-1:] * pad_rows, np.int32)
      rows = _refill_rows(graphdef, state, rows, jnp.asarray(slot_ids), inputs, jnp.asarray(job_ids), rng, *traced,
                          **static, **choice)
      owner[slots] = take
      started[slots] = time.perf_counter()
      stats["refills"] += 1
      free = np.flatnonzero(owner < 0)
    if not pending and free.size == batch_size:
      break
    want_free = min(r, len(pending)) if pending else batch_size
    rows = _decode_until(graphdef, state, rows, jnp.int32(want_free), *traced, **static, **choice, loop=stop_on_loop,
                         confirm=confirm)
    stats["decode_calls"] += 1
    done, num, eos, cut, steps = jax.device_get((rows["done"], rows["num"], rows["eos"], rows["cut"], rows["steps"]))
    finished = np.flatnonzero(done & (owner >= 0))
    if finished.size:
      now = time.perf_counter()
      tokens = np.asarray(jax.device_get(rows["tokens"]))
      for b in finished:
        job = owner[b]
        out_tokens[job], out_num[job] = tokens[b], num[b]
        out_cut[job] = cut[b]
        out_hit[job] = not (eos[b] or cut[b])
        out_seconds[job] = (now - started[b]) / batch_size
        owner[b] = -1
      if on_finished is not None:
        on_finished(int(finished.size))
  stats["decode_steps"] = int(steps)
  return RefillOutput(out_tokens, out_num, out_hit, out_cut, out_seconds, stats)


def _replicated_like(state):
  """A sharding that replicates over the devices holding the model (None when unknown)."""
  sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return None


def _rows_state(cache, b: int, n: int, p: int, keys_B, pad_id=0):
  return {
      "cache": cache,
      "prev": jnp.zeros((b,), jnp.int32),
      "tokens": jnp.full((b, n), pad_id, jnp.int32),
      "num": jnp.zeros((b,), jnp.int32),
      "done": jnp.ones((b,), bool),    # free or finished: not decoding
      "eos": jnp.zeros((b,), bool),
      "cut": jnp.zeros((b,), bool),
      "matches": jnp.zeros((b, p), jnp.int32),
      "keys": keys_B,
      "steps": jnp.zeros((), jnp.int32),
  }


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "max_len", "max_new_tokens", "cache_dtype",
                                             "loop"))
def _empty_rows(graphdef, state, rng, *, batch_size, max_len, max_new_tokens, cache_dtype, loop):
  model = nnx.merge(graphdef, state)
  p = _LoopTracker(loop, max_new_tokens).init(1).shape[1]
  keys_B = jax.random.split(rng, batch_size)
  return _rows_state(model.init_cache(batch_size, max_len, cache_dtype), batch_size, max_new_tokens, p, keys_B)


def _choose_rows(logits_BV, keys_B, num_B, temperature, top_p, vocab_limit, *, greedy, top_k, use_top_p):
  """Tokens of each row; sampling draws row b with fold_in(keys_B[b], num_B[b])."""
  logits_BV = _mask_vocab(logits_BV, vocab_limit)
  if greedy:
    return _select_tokens(logits_BV, None, temperature, top_p, greedy=True, top_k=top_k, use_top_p=use_top_p)
  step_keys = jax.vmap(jax.random.fold_in)(keys_B, num_B)
  pick = lambda l_V, k: _select_tokens(l_V[None], k, temperature, top_p, greedy=False, top_k=top_k,
                                       use_top_p=use_top_p)[0]
  return jax.vmap(pick)(logits_BV, step_keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p"),
                   donate_argnames=("rows",))
def _refill_rows(graphdef, state, rows, slots_R, inputs, jobs_R, rng, temperature, top_p, eos_ids_E, pad_id,
                 vocab_limit, *, max_new_tokens, greedy, top_k, use_top_p):
  model = nnx.merge(graphdef, state)
  r = slots_R.shape[0]
  fresh = model.init_cache(r, rows["tokens"].shape[1] + inputs["input_ids"].shape[1], rows["cache"]["kv"][0][0].dtype)
  logits_RV, fresh = model.prefill(inputs, fresh)
  keys_R = jax.vmap(jax.random.fold_in, (None, 0))(rng, jobs_R)
  first_R = _choose_rows(logits_RV, keys_R, jnp.zeros((r,), jnp.int32), temperature, top_p, vocab_limit,
                         greedy=greedy, top_k=top_k, use_top_p=use_top_p)
  eos_R = jnp.isin(first_R, eos_ids_E)
  put = lambda a, v: a.at[slots_R].set(v, mode="drop")
  return dict(
      rows,
      cache=model.set_cache_rows(rows["cache"], slots_R, fresh),
      prev=put(rows["prev"], first_R),
      tokens=put(rows["tokens"], jnp.full((r, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_R)),
      num=put(rows["num"], jnp.ones((r,), jnp.int32)),
      done=put(rows["done"], eos_R | (max_new_tokens == 1)),
      eos=put(rows["eos"], eos_R),
      cut=put(rows["cut"], jnp.zeros((r,), bool)),
      matches=put(rows["matches"], jnp.zeros((r, rows["matches"].shape[1]), jnp.int32)),
      keys=put(rows["keys"], keys_R),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p", "loop",
                                             "confirm"), donate_argnames=("rows",))
def _decode_until(graphdef, state, rows, want_free, temperature, top_p, eos_ids_E, pad_id, vocab_limit, *,
                  max_new_tokens, greedy, top_k, use_top_p, loop, confirm):
  model = nnx.merge(graphdef, state)
  tracker = _LoopTracker(loop, max_new_tokens, confirm)
  b = rows["num"].shape[0]

  def cond(rows):
    return jnp.sum(rows["done"].astype(jnp.int32)) < want_free

  def body(rows):
    logits_BV, cache = model.decode(rows["prev"], rows["cache"])
    active_B = ~rows["done"]
    num_B = rows["num"]
    next_B = jnp.where(active_B, _choose_rows(logits_BV, rows["keys"], num_B, temperature, top_p, vocab_limit,
                                              greedy=greedy, top_k=top_k, use_top_p=use_top_p), pad_id)
    # Each active row writes its own column; finished rows aim past the end (dropped).
    col_B = jnp.where(active_B, num_B, max_new_tokens)
    tokens_BN = rows["tokens"].at[jnp.arange(b), col_B].set(next_B, mode="drop")
    num_B = num_B + active_B.astype(jnp.int32)
    eos_B = active_B & jnp.isin(next_B, eos_ids_E)
    matches_BP, cut_B = tracker.update(rows["matches"], tokens_BN, next_B, num_B, active_B & ~eos_B)
    done_B = rows["done"] | eos_B | cut_B | (num_B >= max_new_tokens)
    return dict(rows, cache=cache, prev=next_B, tokens=tokens_BN, num=num_B, done=done_B, eos=rows["eos"] | eos_B,
                cut=rows["cut"] | cut_B, matches=matches_BP, steps=rows["steps"] + 1)

  return jax.lax.while_loop(cond, body, rows)
