"""The decoder stack every text family shares: token table, block loop, final norm, (tied) head.

A family's decoder subclasses `DecoderStack`, builds its blocks and norm through `init_stack`, and
runs them with `run_blocks`; what differs between families (block internals, rotary tables, masks,
the embedding scale, the cache layout) stays in the family. Multimodal wrappers that hold such a
decoder as `language_model` reuse `LanguageModelHead` for the head and generation methods that
only forward to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import attention, layers, remat


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """How a training forward runs the block loop (`train.remat`, `train.scan_layers`).

  Attributes:
    remat: a policy of `jaxdpo.models.remat.POLICIES`; every block runs under `jax.checkpoint`
      with it ("none": no checkpoint).
    scan: run repeated runs of identical blocks as one `jax.lax.scan` over their stacked
      parameters (compile once per distinct block kind instead of once per layer).
    unroll: unroll those scans (same program values, no while loop): XLA's cost analysis counts a
      loop body once, so `bench --analyze` counts FLOPs on the unrolled program.
  """

  remat: str = "none"
  scan: bool = False
  unroll: bool = False

  def __post_init__(self):
    remat.check(self.remat)


# The plan of the forward being traced. A context rather than a model attribute: the policy and the
# reference forwards share one graphdef, and generation (kv cache) always runs the plain loop.
_PLAN: contextvars.ContextVar[BlockPlan] = contextvars.ContextVar("block_plan", default=BlockPlan())


@contextlib.contextmanager
def planned(plan: BlockPlan) -> Iterator[None]:
  """Runs the enclosed forward passes (`run_blocks` of every decoder) with `plan`."""
  token = _PLAN.set(plan)
  try:
    yield
  finally:
    _PLAN.reset(token)


def current_plan() -> BlockPlan:
  """The plan `run_blocks` uses now (`BlockPlan()` outside `planned`)."""
  return _PLAN.get()


# Stacked layer states given from outside the forward (`StackedParams`): segment start -> per-offset stacks.
_PRESTACKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prestacked", default=None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedParams:
  """Parameters whose scanned decoder layers are held stacked, as the layer scan reads them.

  The layer scan (`BlockPlan.scan`) stacks the per-layer states of each run of equal blocks inside
  the traced step, a copy of those layers on every forward. Parameters can instead be held
  stacked (`stack_params`): the frozen DPO reference, stacked once at load, and the trained
  params with their optimizer state (`train.stacked_params`), so that gradients, clipping, AdamW
  and the step's guards run over ~14 stacked leaves instead of ~435 per-layer ones. A forward on
  them (`full()` merged into the model, inside `prestacked(stacks)`) scans the given stacks and
  copies nothing; the per-layer leaves `full()` rebuilds are slices of the stacks that the scan
  never reads, so they are dead code in the compiled step (and, differentiated, get no gradient).
  Another per-layer tree (shardings, masks) takes the same layout with `like`.

  Attributes:
    rest: the pure-dict params without the stacked layers' entries.
    stacks: segment start -> one stacked pure dict per offset of the segment's period.
    prefix: (static) the path of the decoder's `layers` list in the pure dict.
    segments: (static) the `scan_segments` entries (start, groups, period) that are stacked.
  """

  rest: dict
  stacks: dict
  prefix: tuple = dataclasses.field(metadata=dict(static=True))
  segments: tuple = dataclasses.field(metadata=dict(static=True))

  def full(self) -> dict:
    """The usual per-layer pure dict (the stacked layers as slices of their stacks)."""
    out = jax.tree.map(lambda x: x, self.rest)  # a new dict tree; leaves shared
    layers = _at(out, self.prefix)
    for start, n_groups, period in self.segments:
      for j in range(period):
        for g in range(n_groups):
          layers[start + g * period + j] = jax.tree.map(lambda x, g=g: x[g], self.stacks[start][j])
    return out

  def like(self, tree: dict, combine: Callable[[list], object]) -> StackedParams:
    """`tree` (per layer, the structure of `full()`) in this layout; `combine` makes one stacked
    leaf from the per-layer leaves of a stack, in layer order (e.g. shardings, `trainable` masks)."""
    return restack(tree, self.prefix, self.segments, combine)


def restack(tree: dict, prefix: tuple, segments: tuple, combine: Callable[[list], object]) -> StackedParams:
  """`tree` with the layers of `segments` ((start, groups, period) entries) combined per offset and
  leaf by `combine` (a list of the groups' leaves, layer order -> one leaf); see `StackedParams`."""
  rest = jax.tree.map(lambda x: x, tree)  # a new dict tree; leaves shared
  layers = _at(rest, prefix)
  stacks = {}
  for start, n_groups, period in segments:
    stacks[start] = [jax.tree.map(lambda *xs: combine(list(xs)), *[layers[start + g * period + j] for g in range(n_groups)])
                     for j in range(period)]
    for i in range(start, start + n_groups * period):
      del layers[i]
  return StackedParams(rest=rest, stacks=stacks, prefix=prefix, segments=tuple(segments))


def _at(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def stack_layout(graphdef, params: dict) -> tuple[tuple, tuple]:
  """(prefix, segments) of `StackedParams` for a model: the path of its decoder's `layers` and the
  `scan_segments` runs of more than one group. `params` may be abstract (ShapeDtypeStructs). The
  model must hold exactly one `DecoderStack`."""
  model = nnx.merge(graphdef, params)
  found = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, DecoderStack)]
  if len(found) != 1:
    raise ValueError(f"stack_params: expected one DecoderStack in the model, found {len(found)}")
  path, stack = found[0]
  segments, start = [], 0
  for n_groups, period in scan_segments(list(stack.layers)):
    if n_groups > 1:
      segments.append((start, n_groups, period))
    start += n_groups * period
  return tuple(path) + ("layers",), tuple(segments)


def stack_params(graphdef, params: dict) -> StackedParams:
  """`params` (pure dict) with the layers of every scan segment of its decoder stacked (see
  `StackedParams`); jit it to stack on device."""
  prefix, segments = stack_layout(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  return restack(params, prefix, segments, lambda xs: jnp.stack(xs))


@contextlib.contextmanager
def prestacked(params: StackedParams) -> Iterator[None]:
  """Runs the enclosed forward passes' layer scans on `params.stacks` instead of stacking."""
  token = _PRESTACKED.set(params.stacks)
  try:
    yield
  finally:
    _PRESTACKED.reset(token)


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
    for block in self.layers:
      remat.tag_block(block)
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
    """Runs every block, then the final norm, as `current_plan()` says.

    Args:
      x_BTD: input embeddings.
      block_inputs: block -> the positional inputs it takes after x (rotary tables, mask),
        so that families with several layer kinds pick the right ones per block.
      kv_cache: optional list of per-layer caches; each block returns its updated one. Generation
        always runs the plain unrolled loop (no remat, no scan).
      cache_index: int [B], the cache slot of each row's first token in this call.

    Returns:
      (hidden [B, T, D] after the final norm, new kv cache or None).
    """
    plan = current_plan()
    if kv_cache is not None:
      new_cache = []
      for i, block in enumerate(self.layers):
        with jax.named_scope(f"block_{i}"):
          x_BTD, c = block(x_BTD, *block_inputs(block), kv_cache[i], cache_index)
        x_BTD = layers.constrain_batch(x_BTD)
        new_cache.append(c)
    else:
      new_cache = None
      start = 0
      for n_groups, period in (scan_segments(self.layers) if plan.scan else [(1, 1)] * len(self.layers)):
        blocks = list(self.layers)[start:start + n_groups * period]
        if n_groups == 1:
          with jax.named_scope(f"block_{start}"):
            x_BTD = _run_block(blocks[0], x_BTD, block_inputs(blocks[0]), plan.remat, prevent_cse=True)
        else:
          with jax.named_scope(f"blocks_{start}_{start + len(blocks) - 1}_scan"):
            given = _PRESTACKED.get()
            if given is None:
              x_BTD = _scan_blocks(blocks, period, x_BTD, block_inputs, plan)
            else:
              x_BTD = _scan_blocks(blocks, period, x_BTD, block_inputs, plan, given[start])
        start += len(blocks)
    with jax.named_scope("final_norm"):
      return self.norm(x_BTD), new_cache

  # Generation caches are dicts of arrays with the batch on axis 0, except the keys listed here.
  cache_batch_axis: dict = {}

  def set_cache_rows(self, cache: dict, rows_R, new: dict) -> dict:
    """`cache` with rows `rows_R` (int [R]; ids >= B are dropped) replaced by the R rows of `new`.

    `new` is a cache of the same length from `init_cache(R, ...)`, e.g. freshly prefilled with
    the prompts that take over finished rows (continuous batching in `jaxdpo.generation.decode`).
    """
    return set_cache_rows(cache, rows_R, new, self.cache_batch_axis)

  def hidden_states(self, inputs: dict):
    """The family-neutral entry used by DPO/SFT steps: inputs dict -> hidden [B, T, D].

    Keys: `input_ids`, `positions`, `segment_ids` (all int [B, T]); prefix-shared rows add
    `attn_order` and `attn_branch` (`attention.from_inputs`).
    """
    h_BTD, _ = self(input_ids=inputs["input_ids"], positions=inputs["positions"],
                    segment_ids=inputs["segment_ids"], structure=attention.from_inputs(inputs))
    return h_BTD


def _run_block(block, x_BTD, inputs: tuple, policy_name: str, *, prevent_cse: bool):
  """x after one block, under `jax.checkpoint` with the named policy unless it is "none"."""
  if policy_name == "none":
    x_BTD, _ = block(x_BTD, *inputs, None, None)
    return layers.constrain_batch(x_BTD)  # keep rows split over the batch axes
  graphdef, state = nnx.split(block)

  def run(state, x_BTD, *inputs):
    out, _ = nnx.merge(graphdef, state)(x_BTD, *inputs, None, None)
    return out

  run = jax.checkpoint(run, policy=remat.policy(policy_name), prevent_cse=prevent_cse)
  return layers.constrain_batch(run(state, x_BTD, *inputs))


def _scan_blocks(blocks, period: int, x_BTD, block_inputs, plan: BlockPlan, given=None):
  """x after `blocks` (len(blocks) / period groups of `period` blocks, equal kinds at equal offsets)
  run as one `jax.lax.scan` over the groups.

  The parameters stay stored per layer (checkpoints and converters see one subtree per layer); they
  are stacked here, inside the traced step, into one [groups, ...] array per offset and leaf. Each
  iteration merges offset j's slice back into a block and runs it with the inputs of the first
  group's block j (same kind, so the same rotary tables and mask). `given`: the per-offset stacks
  already made (`StackedParams`), used instead of stacking here.
  """
  n_groups = len(blocks) // period
  graphdefs, inputs, stacked = [], [], []
  for j in range(period):
    graphdefs.append(nnx.graphdef(blocks[j]))
    inputs.append(block_inputs(blocks[j]))
    if given is None:
      stacked.append(_stack([nnx.split(blocks[g * period + j])[1] for g in range(n_groups)]))
    else:
      stacked.append(given[j])

  def group(x_BTD, states):
    for j in range(period):
      with jax.named_scope(f"offset_{j}"):
        # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recompute
        # with the forward (as jax's `checkpoint` docs advise); True would only add barriers.
        x_BTD = _run_block(nnx.merge(graphdefs[j], states[j]), x_BTD, inputs[j], plan.remat, prevent_cse=False)
    return x_BTD, None

  x_BTD, _ = jax.lax.scan(group, x_BTD, tuple(stacked), unroll=n_groups if plan.unroll else 1)
  return x_BTD


def _stack(states):
  """One [len(states), ...] array per leaf of the per-layer states (layer order kept)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def scan_segments(blocks) -> list[tuple[int, int]]:
  """Splits the block list into (groups, period) runs for `jax.lax.scan`, in layer order.

  Blocks are of one kind when their nnx graphdefs are equal (same structure, same static
  attributes such as a Gemma layer's window). From each start, the run covering the most blocks
  with a repeating pattern of kinds (at least 2 repeats) wins, the shorter period on ties; a block
  that starts no such run is its own (1, 1) entry. Qwen2 (36 equal blocks): [(36, 1)]; Gemma 3 4B
  (5 local + 1 global, 34 layers): [(5, 6), (4, 1)].
  """
  kinds = [nnx.graphdef(b) for b in blocks]
  n, start, out = len(kinds), 0, []
  while start < n:
    best = (1, 1)
    for period in range(1, (n - start) // 2 + 1):
      groups = 1
      while start + (groups + 1) * period <= n and all(
          kinds[start + groups * period + j] == kinds[start + j] for j in range(period)):
        groups += 1
      if groups >= 2 and groups * period > best[0] * best[1]:
        best = (groups, period)
    out.append(best)
    start += best[0] * best[1]
  return out
def set_cache_rows(cache: dict, rows_R, new: dict, batch_axis: dict) -> dict:
  """See `DecoderStack.set_cache_rows`; `batch_axis` maps cache keys to their batch axis (default 0)."""
  def put(axis):
    def one(big, small):
      big0, small0 = jnp.moveaxis(big, axis, 0), jnp.moveaxis(small, axis, 0)
      return jnp.moveaxis(big0.at[rows_R].set(small0.astype(big.dtype), mode="drop"), 0, axis)
    return one
  return {key: jax.tree.map(put(batch_axis.get(key, 0)), leaf, new[key]) for key, leaf in cache.items()}


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

  def set_cache_rows(self, cache: dict, rows_R, new: dict) -> dict:
    """See `DecoderStack.set_cache_rows`."""
    return self.language_model.set_cache_rows(cache, rows_R, new)
