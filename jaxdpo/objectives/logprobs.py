"""Per-token log-probabilities from final hidden states: a fused, chunked LM head.

A training step never materialises [B, T, V] fp32 logits. The positions are cut into chunks;
each chunk's logits are formed, reduced to (log-softmax at the target) and dropped. The head has
its own VJP (`jax.custom_vjp`): the forward keeps only h, W, the targets and the per-position
fp32 logsumexp; the backward recomputes each chunk's logits once, forms the softmax from the
saved logsumexp and emits dh for the chunk and its share of dW (accumulated in fp32) in the same
pass. That is the same matmul count as autodiff of a `jax.checkpoint`ed chunk (forward, one
recompute, dh, dW: recomputing the logits is the least a VJP that stores none can do); what the
custom VJP changes is that dW is accumulated in fp32 across chunks (autodiff summed it in the
compute dtype), the softmax comes from the saved lse, and the backward is one explicit pass.

Callers score only the positions that matter: `completion_logps` with a static `window` gathers
each row's completion predictors (`gather_positions`) before the head, so the head's cost
follows the completion length, not the row length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo.errors import DataError


def _logits(h_BcD, w_VD, softcap):
  """A chunk's fp32 logits (soft-capped when `softcap`): compute-dtype matmul, then fp32."""
  z_BcV = jnp.einsum("BTD,VD->BTV", h_BcD, w_VD.astype(h_BcD.dtype)).astype(jnp.float32)
  return softcap * jnp.tanh(z_BcV / softcap) if softcap else z_BcV


def _dlogits(logits_BcV, lse_Bc, t_Bc, g_Bc, softcap):
  """Cotangent of the pre-cap logits for lp = logit[t] - lse, given dL/dlp = g.

  d lp / d logit_v = onehot(t)_v - softmax_v; the soft cap chains through
  d(cap tanh(z/cap))/dz = 1 - (capped / cap)^2.
  """
  p_BcV = jnp.exp(logits_BcV - lse_Bc[..., None])
  hit_BcV = jax.lax.broadcasted_iota(jnp.int32, logits_BcV.shape, 2) == t_Bc[..., None]
  d_BcV = g_Bc[..., None] * (hit_BcV.astype(jnp.float32) - p_BcV)
  if softcap:
    d_BcV = d_BcV * (1.0 - jnp.square(logits_BcV / softcap))
  return d_BcV


def _over_chunks(fn, carry, xs, unroll):
  """`lax.scan(fn, carry, xs)`, or a direct call for one chunk (jax emits a while even for one
  unrolled iteration, and `bench --analyze` wants no loops left in its count)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    carry, y = fn(carry, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda x: x[None], y)
  return jax.lax.scan(fn, carry, xs, unroll=bool(unroll))


def _head_forward(h_NBcD, w_VD, t_NBc, softcap, unroll):
  def chunk(_, args):
    h_BcD, t_Bc = args
    logits_BcV = _logits(h_BcD, w_VD, softcap)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    tgt_Bc = jnp.take_along_axis(logits_BcV, t_Bc[..., None], axis=-1)[..., 0]
    return None, (tgt_Bc - lse_Bc, lse_Bc)
  _, (lp_NBc, lse_NBc) = _over_chunks(chunk, None, (h_NBcD, t_NBc), unroll)
  return lp_NBc, lse_NBc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head(h_NBcD, w_VD, t_NBc, softcap, unroll):
  return _head_forward(h_NBcD, w_VD, t_NBc, softcap, unroll)[0]


def _head_fwd(h_NBcD, w_VD, t_NBc, softcap, unroll):
  lp_NBc, lse_NBc = _head_forward(h_NBcD, w_VD, t_NBc, softcap, unroll)
  return lp_NBc, (h_NBcD, w_VD, t_NBc, lse_NBc)  # no logits among the residuals


def _head_bwd(softcap, unroll, res, g_NBc):
  h_NBcD, w_VD, t_NBc, lse_NBc = res
  w_c = w_VD.astype(h_NBcD.dtype)

  def chunk(dw_VD, args):
    h_BcD, t_Bc, lse_Bc, g_Bc = args
    d_BcV = _dlogits(_logits(h_BcD, w_c, softcap), lse_Bc, t_Bc, g_Bc.astype(jnp.float32), softcap)
    d_BcV = d_BcV.astype(h_BcD.dtype)  # the matmuls run in the compute dtype, as the forward's
    dh_BcD = jnp.einsum("BTV,VD->BTD", d_BcV, w_c)
    dw_VD = dw_VD + jnp.einsum("BTV,BTD->VD", d_BcV, h_BcD, preferred_element_type=jnp.float32)
    return dw_VD, dh_BcD

  dw_VD, dh_NBcD = _over_chunks(chunk, jnp.zeros(w_VD.shape, jnp.float32), (h_NBcD, t_NBc, lse_NBc, g_NBc), unroll)
  return dh_NBcD, dw_VD.astype(w_VD.dtype), None  # targets are integers: no cotangent


_head.defvjp(_head_fwd, _head_bwd)


def token_logps(h_BTD, w_VD, targets_BT, *, chunk_size: int = 256, logit_softcap: float | None = None,
                unroll: bool = False):
  """log p(targets[t] | h[t]) for every t, fp32 [B, T], through the fused head (see module doc).

  Any [B, T, D] works, including hidden states already gathered at chosen positions
  (`gather_positions`).

  Args:
    h_BTD: final hidden states (after the final norm).
    w_VD: the LM-head matrix.
    targets_BT: int token ids to score at each position (already shifted by the caller).
    chunk_size: positions per chunk (the last chunk is padded; padded positions are dropped).
    logit_softcap: optional tanh soft-capping of the logits (cap * tanh(x / cap)).
    unroll: unroll the chunk loops of the forward and the backward (same values). XLA's cost
      analysis counts a loop body once, so `python -m jaxdpo.bench --analyze` counts FLOPs on the
      unrolled program.

  Returns:
    fp32 [B, T] log-probabilities.
  """
  b, t, d = h_BTD.shape
  c = min(chunk_size, t)
  n_chunks = -(-t // c)
  pad = n_chunks * c - t
  if pad:
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_NBcD = h_BTD.reshape(b, n_chunks, c, d).swapaxes(0, 1)
  t_NBc = targets_BT.reshape(b, n_chunks, c).swapaxes(0, 1).astype(jnp.int32)
  lp_NBc = _head(h_NBcD, w_VD, t_NBc, float(logit_softcap) if logit_softcap else None, bool(unroll))
  return lp_NBc.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :t]


def gather_positions(h_BTD, index_BK):
  """h at the given positions of each row: [B, K, D] (a take along T; its gradient scatters back)."""
  return jnp.take_along_axis(h_BTD, index_BK[..., None].astype(jnp.int32), axis=1)


WINDOW_MULTIPLE = 16  # completion windows are rounded up to this (tile-aligned rows on GPU)


class CompletionLogps(NamedTuple):
  """Completion log-probs of each row.

  Attributes:
    sums: summed log-probs of the completion tokens, fp32 [B].
    per_token: masked per-token log-probs in sequence order, fp32 [B, K] (0 off the completion);
      K = T-1 on the full row, the window otherwise.
    counts: completion tokens scored, fp32 [B].
    mask: 1.0 where `per_token` holds a completion token, fp32 [B, K].
  """

  sums: jax.Array
  per_token: jax.Array
  counts: jax.Array
  mask: jax.Array


def window_for(max_completion: int, max_length: int) -> int:
  """The static completion window for completions of at most `max_completion` tokens in rows of
  `max_length`: rounded up to `WINDOW_MULTIPLE`, at most `max_length - 1` (every predictor)."""
  k = -(-max(int(max_completion), 1) // WINDOW_MULTIPLE) * WINDOW_MULTIPLE
  return min(k, max_length - 1)


def check_window(loss_mask, window: int | None, where: str = "batch") -> None:
  """Refuses (host side) a batch whose completion spans are longer than the step's window.

  Args:
    loss_mask: host int array [..., T].
    window: the step's `completion_window` (None: the whole row, nothing to check).
    where: what the rows are, for the message.
  """
  if window is None:
    return
  m = np.asarray(loss_mask).reshape(-1, np.shape(loss_mask)[-1]).astype(bool)
  m[:, 0] = False  # token 0 has no predictor and is never scored
  first = np.argmax(m, axis=1)
  last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
  span = np.where(m.any(axis=1), last - first + 1, 0)
  if span.max(initial=0) > window:
    row = int(np.argmax(span))
    raise DataError(f"{where}: row {row} has a completion span of {int(span[row])} tokens, longer than the step's "
                    f"completion window of {window} (StepConfig.completion_window); it would be cut")


def completion_positions(loss_mask_BT, window: int):
  """Where each row's completion lies, as a static window of `window` target positions.

  Returns:
    (target positions j [B, K] (the predictor of token j is position j-1), window mask [B, K]
    fp32 (1 where token j is a completion token), completion tokens of the whole row [B] fp32).
  """
  t = loss_mask_BT.shape[1]
  m_BT = loss_mask_BT.astype(bool).at[:, 0].set(False)  # token 0 has no predictor
  start_B = jnp.argmax(m_BT, axis=1)  # first completion token (0 when none: nothing is scored)
  j_BK = start_B[:, None] + jnp.arange(window)[None]
  inside_BK = j_BK <= t - 1
  j_BK = jnp.minimum(j_BK, t - 1)
  mask_BK = (jnp.take_along_axis(m_BT, j_BK, axis=1) & inside_BK).astype(jnp.float32)
  return j_BK, mask_BK, m_BT.astype(jnp.float32).sum(-1)


def completion_logps(h_BTD, w_VD, input_ids_BT, loss_mask_BT, *, chunk_size: int = 256,
                     logit_softcap: float | None = None, unroll: bool = False,
                     window: int | None = None) -> CompletionLogps:
  """Summed log-probs of completion tokens, plus the per-token values.

  Token t+1 is predicted from position t; it counts when `loss_mask[t+1]` is set. The mask
  comes from explicit completion spans (lengths / segment ids), never from `ids != pad`.

  With `window` (static, < T-1), only each row's completion is scored: the hidden states of the
  `window` predictors from the row's first completion token on are gathered
  (`gather_positions`) and go through the head, instead of all T-1 positions. A row whose
  completion extends past its window gets a NaN sum (never a silently cut one); jobs refuse such
  batches on the host first (`check_window`).

  Returns:
    `CompletionLogps` (per-token values and mask [B, T-1] on the full row, [B, window] otherwise).
  """
  t = h_BTD.shape[1]
  kw = dict(chunk_size=chunk_size, logit_softcap=logit_softcap, unroll=unroll)
  if window is None or window >= t - 1:
    mask_BK = loss_mask_BT[:, 1:].astype(jnp.float32)
    lp_BK = token_logps(h_BTD[:, :-1], w_VD, input_ids_BT[:, 1:], **kw) * mask_BK
    return CompletionLogps(lp_BK.sum(-1), lp_BK, mask_BK.sum(-1), mask_BK)
  j_BK, mask_BK, total_B = completion_positions(loss_mask_BT, window)
  h_BKD = gather_positions(h_BTD, jnp.maximum(j_BK - 1, 0))
  lp_BK = token_logps(h_BKD, w_VD, jnp.take_along_axis(input_ids_BT, j_BK, axis=1), **kw) * mask_BK
  counts_B = mask_BK.sum(-1)
  sums_B = jnp.where(counts_B == total_B, lp_BK.sum(-1), jnp.nan)  # a completion longer than the window
  return CompletionLogps(sums_B, lp_BK, counts_B, mask_BK)


def resolve_softcap(override: float | None, model) -> float | None:
  """The final-logit soft cap to train with: an explicit override, else what the model's own
  `logits` applies (its `logit_softcap`, None for families without one)."""
  return override if override is not None else getattr(model, "logit_softcap", None)
