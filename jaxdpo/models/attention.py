"""Attention described by structure, and the backends that run it.

A model states *what* may attend to what as a `Structure`: segment ids, token order, causality,
a sliding window, bidirectional groups (Gemma 3 image tokens) and branches (a prefix-shared DPO
row). `attend` picks the kernel from the structure's static `layout` and the requested backend:

  xla    (CPU, and every layout): the boolean mask [B, T, S] is built here, inside the call, from
         the structure (`attention_mask`), and passed to XLA's attention. This is the reference
         every other backend is held to.
  cudnn  (GPU): flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
         with `is_causal`, `query_seq_lengths` / `key_value_seq_lengths` and `local_window_size`;
         no mask tensor exists. Layouts:
           rows   one right-padded segment per row: one causal call.
           shared one pair per row, [P | C | R] (prompt, chosen, rejected): two causal calls,
                  [P | C] (the row itself, keys cut at P + C) and [P | R] (P's and R's keys and
                  queries gathered into a compact row), each an ordinary flash call with its own
                  backward, and R's outputs scattered back. jax 0.10's cuDNN call takes no
                  segment ids, and combining two flash calls through `return_residual` drops the
                  residual's cotangent in the backward (wrong gradients), hence the gather.
         SHARED promises contiguous P, C, R (in that order) then padding in each row, and an order
         equal to the unshared rows' slots (P 0..p-1, C and R each from p).
         Anything the flash call cannot state (bidirectional groups, general cache layouts of
         generation) falls back to the xla path, mask included.
  splash (TPU): the place for Pallas splash attention with segment ids; not built yet, refused
         with an error rather than silently run densely.

Padding is segment 0 and is never attended to; masks never look at token ids (pad can equal EOS).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

# Static layouts a structure can promise (see the module docstring).
ROWS, SHARED, ANY = "rows", "shared", "any"
# Branch ids of a prefix-shared row: the prompt is seen by both completions; a completion sees
# the prompt and itself only.
PROMPT, CHOSEN, REJECTED = 0, 1, 2


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_segment_ids", "kv_segment_ids", "q_index", "kv_index", "q_groups", "kv_groups",
                                "q_branch", "kv_branch"],
                   meta_fields=["causal", "sliding_window", "layout"])
@dataclasses.dataclass(frozen=True)
class Structure:
  """Who may attend to whom, without a mask tensor (a pytree; flags are static).

  Attributes:
    q_segment_ids, kv_segment_ids: int [B, T], [B, S]; equal non-zero ids may attend, 0 = padding.
    q_index, kv_index: int [B, T], [B, S] token order for causality and the window (the
      position in the unshared row, a cache slot); None = the slot in the row (arange).
    q_groups, kv_groups: optional int [B, T], [B, S] bidirectional groups (0 = none).
    q_branch, kv_branch: optional int [B, T], [B, S] branch ids of a shared row: a key of branch
      0 is visible to every query, a key of another branch only to queries of the same branch.
    causal: keys must not come after queries (by index).
    sliding_window: if set, q_index - kv_index < sliding_window (bounds the groups too).
    layout: ROWS, SHARED or ANY: what the arrays promise, so a backend can choose its kernel
      without reading values (see the module docstring).
  """

  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_index: jax.Array | None = None
  kv_index: jax.Array | None = None
  q_groups: jax.Array | None = None
  kv_groups: jax.Array | None = None
  q_branch: jax.Array | None = None
  kv_branch: jax.Array | None = None
  causal: bool = True
  sliding_window: int | None = None
  layout: str = ANY

  def windowed(self, window: int | None) -> "Structure":
    """The same structure with a sliding window (Gemma 3's local layers)."""
    return dataclasses.replace(self, sliding_window=window)

  def dense_mask(self):
    """The boolean mask [B, T, S] this structure describes (the xla path and the reference)."""
    return attention_mask(self.q_segment_ids, self.kv_segment_ids, self.q_index, self.kv_index, causal=self.causal,
                          sliding_window=self.sliding_window, bidirectional_q=self.q_groups,
                          bidirectional_kv=self.kv_groups, branch_q=self.q_branch, branch_kv=self.kv_branch)


def self_attention(segment_ids, *, order=None, branch=None, groups=None) -> Structure:
  """The causal self-attention structure of a training row batch.

  Args:
    segment_ids: int [B, T], 1 on real tokens and 0 on (right) padding.
    order: optional int [B, T] token order (the prefix-shared layout's positions in the unshared
      rows); None = the slot.
    branch: optional int [B, T] branch ids (PROMPT, CHOSEN, REJECTED) of prefix-shared rows
      [P | C | R]; needs `order`.
    groups: optional int [B, T] bidirectional groups.

  Returns:
    A `Structure` with layout ROWS (no branch) or SHARED.
  """
  if (branch is None) != (order is None):
    raise ValueError("a prefix-shared row needs both its token order and its branch ids")
  return Structure(segment_ids, segment_ids, order, order, groups, groups, branch, branch,
                   layout=ROWS if branch is None else SHARED)


def from_inputs(inputs: dict, groups=None) -> Structure:
  """`self_attention` of a model-inputs dict: `segment_ids`, and `attn_order` / `attn_branch` for
  prefix-shared rows; with `pack_count` (packed rows, `jaxdpo.data.packing`) the layout is ANY:
  jax 0.10's flash call has no segment ids, so packed rows take the dense path."""
  st = self_attention(inputs["segment_ids"], order=inputs.get("attn_order"), branch=inputs.get("attn_branch"),
                      groups=groups)
  if "pack_count" in inputs:  # packed rows: several pairs per row, told apart by segment ids
    st = dataclasses.replace(st, layout=ANY)
  return st


def attention_mask(q_segment_ids, kv_segment_ids, q_index=None, kv_index=None, *, causal: bool = True,
                   sliding_window: int | None = None, bidirectional_q=None, bidirectional_kv=None, branch_q=None,
                   branch_kv=None):
  """Boolean attention mask [B, T, S] built from explicit segment ids and token indices.

  Args:
    q_segment_ids, kv_segment_ids: int [B, T], [B, S]; equal non-zero ids may attend.
    q_index, kv_index: int [B, T], [B, S] order of tokens (cache slot / position in the row),
      used for causality and sliding windows. Default: arange.
    causal: keys must not come after queries.
    sliding_window: if set, keys must satisfy q_index - kv_index < sliding_window (applied
      after the bidirectional groups, so it also bounds them).
    bidirectional_q, bidirectional_kv: optional int [B, T], [B, S] group ids (0 = none);
      tokens in the same non-zero group see each other regardless of causality (Gemma 3 image
      tokens).
    branch_q, branch_kv: optional int [B, T], [B, S] branch ids; a key of branch 0 is seen by all,
      others only by queries of their own branch (a shared row's rejected never sees chosen).

  Returns:
    bool [B, T, S].
  """
  b, t = q_segment_ids.shape
  s = kv_segment_ids.shape[1]
  if q_index is None:
    q_index = jnp.broadcast_to(jnp.arange(t), (b, t))
  if kv_index is None:
    kv_index = jnp.broadcast_to(jnp.arange(s), (b, s))
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if branch_q is not None:
    mask = mask & ((branch_kv[:, None, :] == PROMPT) | (branch_kv[:, None, :] == branch_q[:, :, None]))
  order = jnp.ones_like(mask)
  if causal:
    order = kv_index[:, None, :] <= q_index[:, :, None]
  if bidirectional_q is not None:
    same_group = (bidirectional_q[:, :, None] == bidirectional_kv[:, None, :]) & (bidirectional_q[:, :, None] != 0)
    order = order | same_group
  if sliding_window is not None:
    # After the bidirectional OR, as transformers composes Gemma 3's local mask:
    # AND(window, OR(causal, same image)). A group longer than the window is cut by it.
    order = order & (q_index[:, :, None] - kv_index[:, None, :] < sliding_window)
  return mask & order


Implementation = Literal["xla", "cudnn", "splash"] | None


def attend(q_BTNH, k_BSKH, v_BSKH, structure, *, scale: float, implementation: Implementation = None):
  """Grouped-query attention of `structure` on the requested backend.

  Args:
    q_BTNH, k_BSKH, v_BSKH: queries, keys, values.
    structure: a `Structure`; or a bool mask [B, T, S] (vision towers' non-causal frame
      masks), or None (no mask at all). Raw masks always take the masked path.
    scale: the logit scale.
    implementation: "xla", "cudnn", "splash" or None (jax's default choice, masked).

  Returns:
    [B, T, N, H] in the queries' dtype. Softmax runs in fp32 for fp32 inputs; for bf16 inputs
    XLA and cuDNN accumulate in fp32 internally.
  """
  if implementation == "splash":
    raise NotImplementedError("TPU splash attention (segment ids) is not built yet; use model.attention_impl=xla")
  if isinstance(structure, Structure):
    if implementation == "cudnn" and flash_layout(structure):
      return flash_route(q_BTNH, k_BSKH, v_BSKH, structure, scale=scale)
    mask = structure.dense_mask()
  else:
    mask = structure
  mask = None if mask is None else mask[:, None, :, :]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, scale=scale, implementation=implementation)


def flash_layout(st: Structure) -> bool:
  """Whether a flash call (causal, lengths, window; no segment ids) can state `st` exactly."""
  return st.causal and st.q_groups is None and st.layout in (ROWS, SHARED)


def flash_route(q, k, v, st: Structure, *, scale: float, kernel: str = "cudnn"):
  """`st` (layout ROWS or SHARED) as causal flash calls; `kernel="xla"` runs the same route with
  XLA's attention (the tests hold the route to the dense reference on CPU that way)."""
  if not flash_layout(st):
    raise ValueError(f"no flash route for a structure of layout {st.layout!r} (groups or non-causal)")
  flash = functools.partial(_flash, window=st.sliding_window, scale=scale, kernel=kernel)
  real = st.q_segment_ids != 0
  if st.layout == ROWS:
    return flash(q, k, v, jnp.sum(real, axis=1).astype(jnp.int32))
  # SHARED: [P | C | R] rows as two causal calls, [P | C] and the gathered [P | R] (exact: each
  # call's keys are exactly what its queries may see, in the unshared rows' order).
  branch = st.q_branch
  n_p = jnp.sum(real & (branch == PROMPT), axis=1).astype(jnp.int32)
  n_c = jnp.sum(real & (branch == CHOSEN), axis=1).astype(jnp.int32)
  n_r = jnp.sum(real & (branch == REJECTED), axis=1).astype(jnp.int32)
  t = q.shape[1]
  # [P | C] is the row's own prefix: queries and keys past P + C are cut by the lengths.
  out_pc = flash(q, k, v, n_p + n_c)
  # [P | R]: slot j of the compact row is P's j-th token, then R's (j - P)-th.
  j_T = jnp.arange(t, dtype=jnp.int32)[None]
  src_BT = jnp.minimum(jnp.where(j_T < n_p[:, None], j_T, j_T + n_c[:, None]), t - 1)
  take = lambda x, index_BT: jnp.take_along_axis(x, index_BT[:, :, None, None], axis=1)
  out_pr = flash(take(q, src_BT), take(k, src_BT), take(v, src_BT), n_p + n_r)
  # Rejected slot s sits at s - C in the compact row.
  out_r = take(out_pr, jnp.clip(j_T - n_c[:, None], 0, t - 1))
  is_r = (real & (branch == REJECTED))[:, :, None, None]
  return jnp.where(is_r, out_r, out_pc)


def _flash(q, k, v, lengths_B, *, window, scale, kernel):
  """One causal flash call over right-padded rows of `lengths_B` real tokens."""
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths_B,
                                      key_value_seq_lengths=lengths_B,
                                      local_window_size=None if window is None else (window - 1, 0),
                                      implementation=kernel)
