"""Preference losses and TRL-named metrics.

Every formula follows TRL's `DPOTrainer` (trl 1.16) so that `tests/test_trl_parity.py` can
hold them to it. With r_c = pi_c - ref_c, r_r = pi_r - ref_r (log-ratios), s_c, s_r their
f-divergence scores (s = r for the default reverse KL) and d = s_c - s_r, eps = label_smoothing:
  sigmoid:      -(1-eps) log s(beta d) - eps log s(-beta d)   (eps: jaxdpo's cDPO; TRL has none)
  hinge:        relu(1 - beta d)
  ipo:          (s_c/n_c - s_r/n_r - 1/(2 beta))^2             (per-token averaged, as TRL)
  exo_pair:     q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps), q_w = s(beta d), q_l = s(-beta d)
  nca_pair:     -log s(beta r_c) - log s(-beta r_c)/2 - log s(-beta r_r)/2
  robust:       (-(1-eps) log s(beta d) + eps log s(-beta d)) / (1 - 2 eps)
  bco_pair:     -log s(beta r_c) - log s(-beta r_r)
  sppo_hard:    (r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2
  aot:          sigmoid-with-eps on sort(pi_c - pi_r) - sort(ref_c - ref_r)   (sorted over the batch)
  aot_unpaired: sigmoid-with-eps on sort(r_c) - sort(r_r)
  apo_zero:     1 - s(beta r_c) + s(beta r_r)
  apo_down:     s(beta r_c) + 1 - s(beta (r_c - r_r))
  discopop:     -log s(beta d) (1 - m) + exp(-beta d) m,  m = s(beta d / tau)
  sigmoid_norm: -log s(beta (s_c/n_c - s_r/n_r))
  sft:          mean NLL over the batch's chosen tokens (added by the step: it needs token sums)
Several types combine as sum_k w_k mean(loss_k). TRL 1.16's bco_pair has no running reward
mean (older TRL's BCO kept one), so neither does this: every loss is a function of the batch.
`reference_free` sets the reference log-probs to zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdpo.objectives.loss_config import (LABEL_SMOOTHED, LOSS_TYPES, DPOLossConfig,  # noqa: F401 (re-exported)
                                           check_grad_accum)

_LOG_SIGMOID = jax.nn.log_sigmoid


def length_desensitized(per_tok_BST, mask_BST, ld_alpha: float):
  """LD-DPO sequence log-probs [B, 2]: the first min(n_c, n_r) completion tokens of each pair
  count fully, the later ones (the longer completion's tail) with weight `ld_alpha`.

  Args:
    per_tok_BST: masked per-token log-probs [B, 2, K] in sequence order (0 off the completion):
      the whole row (K = T-1) or a completion window (`logprobs.completion_logps`).
    mask_BST: the completion mask aligned with them (`loss_mask[..., 1:]` on the whole row).
    ld_alpha: the tail weight; 1 gives the plain sums.
  """
  mask = mask_BST.astype(jnp.float32)
  position = jnp.cumsum(mask, axis=-1)  # 1-based index of each completion token
  shared = jnp.min(mask.sum(-1), axis=1)  # [B]
  weight = jnp.where(position <= shared[:, None, None], 1.0, ld_alpha)
  return (per_tok_BST * weight).sum(-1)


def f_scores(ratio, cfg: DPOLossConfig):
  """The f-DPO score f'(pi/ref) of a log-ratio (the log-ratio itself for reverse KL)."""
  kind = cfg.f_divergence_type
  if kind == "reverse_kl":
    return ratio
  if kind == "forward_kl":  # f'(t) = 1 - 1/t
    return 1 - jnp.exp(-ratio)
  if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
    return math.log(2) + _LOG_SIGMOID(ratio)
  if kind == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1)
    a = cfg.f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:  # the limit is log t (TRL's threshold)
      return ratio
    t = jnp.minimum((a - 1.0) * ratio.astype(jnp.float32), 80.0)  # TRL's clamp, exp stays finite
    return ((jnp.exp(t) - 1.0) / (a - 1.0)).astype(ratio.dtype)
  raise ValueError(kind)  # guarded by DPOLossConfig


def _smoothed_sigmoid(x, eps):
  return -(1 - eps) * _LOG_SIGMOID(x) - eps * _LOG_SIGMOID(-x)


def _one_loss(kind, cfg, pc, pr, rc, rr, ratio_c, ratio_r, s_c, s_r, len_c, len_r):
  beta, eps = cfg.beta, cfg.label_smoothing
  d = s_c - s_r
  if kind == "sigmoid":
    return _smoothed_sigmoid(beta * d, eps)
  if kind == "hinge":
    return jax.nn.relu(1 - beta * d)
  if kind in ("ipo", "sigmoid_norm"):
    avg = s_c / jnp.maximum(len_c, 1.0) - s_r / jnp.maximum(len_r, 1.0)
    return (avg - 1 / (2 * beta)) ** 2 if kind == "ipo" else -_LOG_SIGMOID(beta * avg)
  if kind == "exo_pair":
    x = beta * d
    return (jax.nn.sigmoid(x) * (_LOG_SIGMOID(x) - math.log1p(-eps))
            + jax.nn.sigmoid(-x) * (_LOG_SIGMOID(-x) - math.log(eps)))
  if kind == "nca_pair":
    return -_LOG_SIGMOID(beta * ratio_c) - 0.5 * _LOG_SIGMOID(-beta * ratio_c) - 0.5 * _LOG_SIGMOID(-beta * ratio_r)
  if kind == "robust":
    return (-(1 - eps) * _LOG_SIGMOID(beta * d) + eps * _LOG_SIGMOID(-beta * d)) / (1 - 2 * eps)
  if kind == "bco_pair":
    return -_LOG_SIGMOID(beta * ratio_c) - _LOG_SIGMOID(-beta * ratio_r)
  if kind == "sppo_hard":
    return (ratio_c - 0.5 / beta) ** 2 + (ratio_r + 0.5 / beta) ** 2
  if kind == "aot":
    return _smoothed_sigmoid(beta * (jnp.sort(pc - pr) - jnp.sort(rc - rr)), eps)
  if kind == "aot_unpaired":
    return _smoothed_sigmoid(beta * (jnp.sort(ratio_c) - jnp.sort(ratio_r)), eps)
  if kind == "apo_zero":
    return 1 - jax.nn.sigmoid(beta * ratio_c) + jax.nn.sigmoid(beta * ratio_r)
  if kind == "apo_down":
    return jax.nn.sigmoid(beta * ratio_c) + 1 - jax.nn.sigmoid(beta * (ratio_c - ratio_r))
  if kind == "discopop":
    x = beta * d
    m = jax.nn.sigmoid(x / cfg.discopop_tau)
    return -_LOG_SIGMOID(x) * (1 - m) + jnp.exp(-x) * m
  if kind == "sft":  # token-level: the step adds it with weight `cfg.sft_weight`
    return jnp.zeros_like(d)
  raise ValueError(kind)  # guarded by DPOLossConfig


def pair_losses(policy_c, policy_r, ref_c, ref_r, len_c, len_r, cfg: DPOLossConfig):
  """Per-pair preference losses [B] (the weighted sum over `cfg.types`, sft excluded) and the log-ratios.

  Args:
    policy_c, policy_r: summed completion log-probs of the policy, fp32 [B] (LD-weighted with ld_alpha).
    ref_c, ref_r: the same for the reference (ignored when `reference_free`).
    len_c, len_r: completion token counts [B] (IPO's and sigmoid_norm's length normalisation).
    cfg: loss hyperparameters.

  Returns:
    (losses [B], chosen log-ratio [B], rejected log-ratio [B]). For aot / aot_unpaired the
    losses are those of the sorted batch: only their sum is meaningful.
  """
  if cfg.reference_free:
    ref_c = jnp.zeros_like(policy_c)
    ref_r = jnp.zeros_like(policy_r)
  ratio_c = policy_c - ref_c
  ratio_r = policy_r - ref_r
  s_c, s_r = f_scores(ratio_c, cfg), f_scores(ratio_r, cfg)
  losses = jnp.zeros_like(ratio_c)
  for kind, weight in zip(cfg.types, cfg.loss_weights):
    if kind != "sft":
      losses = losses + weight * _one_loss(kind, cfg, policy_c, policy_r, ref_c, ref_r, ratio_c, ratio_r, s_c, s_r,
                                           len_c, len_r)
  return losses, ratio_c, ratio_r


def metric_sums(losses, ratio_c, ratio_r, policy_c, policy_r, beta):
  """Per-batch *sums* of TRL's metrics; divide by the number of pairs to get TRL's means.

  Sums (not means) so that gradient accumulation over micro-batches of any size averages
  exactly like one large batch.
  """
  rewards_c = beta * ratio_c
  rewards_r = beta * ratio_r
  return {
      "rewards/chosen": rewards_c.sum(),
      "rewards/rejected": rewards_r.sum(),
      "rewards/accuracies": (rewards_c > rewards_r).astype(jnp.float32).sum(),
      "rewards/margins": (rewards_c - rewards_r).sum(),
      "logps/chosen": policy_c.sum(),
      "logps/rejected": policy_r.sum(),
  }
