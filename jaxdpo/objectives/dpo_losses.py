"""Preference losses and TRL-named metrics.

Every formula follows TRL's `DPOTrainer` (trl 1.16) so that `tests/test_trl_parity.py` can
hold them to it:
  delta = (pi_c - ref_c) - (pi_r - ref_r)
  sigmoid: -(1-eps) log s(beta delta) - eps log s(-beta delta)   (cDPO label smoothing)
  robust:  (-(1-eps) log s(beta delta) + eps log s(-beta delta)) / (1 - 2 eps)
  hinge:   relu(1 - beta delta)
  ipo:     (delta_avg - 1/(2 beta))^2, with per-token averaged log-ratios (as TRL does)
`reference_free` sets the reference log-probs to zero. The SFT (RPO) term is added by the
step, since it needs token-level sums.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdpo.errors import ConfigError

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
LABEL_SMOOTHED = ("sigmoid", "robust")  # the losses with a label-smoothing term


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
  """Hyperparameters of the preference loss."""

  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  rpo_alpha: float = 0.0
  reference_free: bool = False

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ConfigError(f"config.dpo.loss_type={self.loss_type!r}; expected one of {LOSS_TYPES}")
    if self.loss_type == "robust" and not 0.0 <= self.label_smoothing < 0.5:
      raise ConfigError(f"config.dpo.label_smoothing must be in [0, 0.5) for the robust loss, got {self.label_smoothing}")
    if not 0.0 <= self.label_smoothing <= 0.5:
      raise ConfigError(f"config.dpo.label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
    if self.label_smoothing and self.loss_type not in LABEL_SMOOTHED:
      # TRL's hinge and IPO losses have no label-smoothing term; training on would ignore it.
      raise ConfigError(f"config.dpo.label_smoothing={self.label_smoothing} has no effect on the {self.loss_type!r} "
                        f"loss; it applies to {LABEL_SMOOTHED} only (set it to 0)")


def pair_losses(policy_c, policy_r, ref_c, ref_r, len_c, len_r, cfg: DPOLossConfig):
  """Per-pair preference losses [B] and the log-ratios used for rewards.

  Args:
    policy_c, policy_r: summed completion log-probs of the policy, fp32 [B].
    ref_c, ref_r: the same for the reference (ignored when `reference_free`).
    len_c, len_r: completion token counts [B] (IPO's length normalisation).
    cfg: loss hyperparameters.

  Returns:
    (losses [B], chosen log-ratio [B], rejected log-ratio [B]).
  """
  if cfg.reference_free:
    ref_c = jnp.zeros_like(policy_c)
    ref_r = jnp.zeros_like(policy_r)
  ratio_c = policy_c - ref_c
  ratio_r = policy_r - ref_r
  delta = ratio_c - ratio_r
  eps, beta = cfg.label_smoothing, cfg.beta
  if cfg.loss_type == "sigmoid":
    losses = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
  elif cfg.loss_type == "robust":
    losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * delta) + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
  elif cfg.loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * delta)
  elif cfg.loss_type == "ipo":
    avg_delta = ratio_c / jnp.maximum(len_c, 1.0) - ratio_r / jnp.maximum(len_r, 1.0)
    losses = (avg_delta - 1 / (2 * beta)) ** 2
  else:  # guarded by DPOLossConfig
    raise ValueError(cfg.loss_type)
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
