"""Per-token log-probabilities from final hidden states, computed in chunks.

A training step never materialises [B, T, V] fp32 logits: the sequence is cut into chunks,
each chunk's logits are formed, reduced to (log-softmax at the target) and dropped. Each chunk
is rematerialised in the backward pass (`jax.checkpoint`), so peak memory holds one chunk of
logits instead of the full tensor. With V=151936 and T=2048, that is the difference between
~1.2 GB and ~40 MB per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(h_BTD, w_VD, targets_BT, *, chunk_size: int = 256, logit_softcap: float | None = None,
                unroll: bool = False):
  """log p(targets[t] | h[t]) for every t, fp32 [B, T].

  Args:
    h_BTD: final hidden states (after the final norm).
    w_VD: the LM-head matrix.
    targets_BT: int token ids to score at each position (already shifted by the caller).
    chunk_size: sequence positions per chunk.
    logit_softcap: optional tanh soft-capping of the logits (cap * tanh(x / cap)).
    unroll: unroll the chunk loop (same values). XLA's cost analysis counts a loop body once,
      so `python -m jaxdpo.bench --analyze` counts FLOPs on the unrolled program.

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
  h_CBcD = h_BTD.reshape(b, n_chunks, c, d).swapaxes(0, 1)
  t_CBc = targets_BT.reshape(b, n_chunks, c).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(h_BcD, t_Bc):
    logits_BcV = jnp.einsum("BTD,VD->BTV", h_BcD, w_VD.astype(h_BcD.dtype)).astype(jnp.float32)
    if logit_softcap:
      logits_BcV = logit_softcap * jnp.tanh(logits_BcV / logit_softcap)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    tgt_Bc = jnp.take_along_axis(logits_BcV, t_Bc[..., None], axis=-1)[..., 0]
    return tgt_Bc - lse_Bc

  if n_chunks == 1:  # no loop at all (jax emits a while even for one unrolled iteration)
    lp_CBc = chunk(h_CBcD[0], t_CBc[0])[None]
  else:
    _, lp_CBc = jax.lax.scan(lambda carry, args: (carry, chunk(*args)), None, (h_CBcD, t_CBc),
                             unroll=bool(unroll))
  return lp_CBc.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :t]


def completion_logps(h_BTD, w_VD, input_ids_BT, loss_mask_BT, *, chunk_size: int = 256,
                     logit_softcap: float | None = None, unroll: bool = False):
  """Summed log-probs of completion tokens, plus the per-token values.

  Token t+1 is predicted from position t; it counts when `loss_mask[t+1]` is set. The mask
  comes from explicit completion spans (lengths / segment ids), never from `ids != pad`.

  Returns:
    (sum over completion tokens [B], per-token masked log-probs [B, T-1], token counts [B]).
  """
  targets_BT = input_ids_BT[:, 1:]
  mask_BT = loss_mask_BT[:, 1:].astype(jnp.float32)
  lp_BT = token_logps(h_BTD[:, :-1], w_VD, targets_BT, chunk_size=chunk_size, logit_softcap=logit_softcap,
                      unroll=unroll)
  lp_BT = lp_BT * mask_BT
  return lp_BT.sum(-1), lp_BT, mask_BT.sum(-1)


def resolve_softcap(override: float | None, model) -> float | None:
  """The final-logit soft cap to train with: an explicit override, else what the model's own
  `logits` applies (its `logit_softcap`, None for families without one)."""
  return override if override is not None else getattr(model, "logit_softcap", None)
