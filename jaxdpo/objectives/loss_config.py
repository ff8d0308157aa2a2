"""The preference-loss settings, checked the way TRL 1.16's `DPOConfig` / `DPOTrainer` check them.

`loss_type` is one of TRL's 15 loss types or several joined by commas ("sigmoid,sft"); the
per-pair losses are then combined as `sum_k loss_weights[k] * mean(loss_k)` (TRL's MPO-style
combination; all weights 1 by default). Every refusal names the `config.dpo.*` key, and where TRL
refuses the same setting the reason is TRL's.
"""

from __future__ import annotations

import dataclasses

from jaxdpo.errors import ConfigError

# TRL 1.16's loss types, in its order.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# The losses with a label-smoothing term: TRL's robust, exo_pair, aot, aot_unpaired, plus jaxdpo's
# cDPO on sigmoid (TRL 1.16's sigmoid has no smoothing term and ignores label_smoothing).
LABEL_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: "the f-DPO reparameterization leaves a beta log Z(x) term that only cancels in the
# chosen-rejected reward difference, so the other losses have no valid f-divergence generalization".
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Losses that sort log-ratios across the batch: a micro-batch's share is not a sum over its pairs.
BATCH_SORTED = ("aot", "aot_unpaired")


def parse_loss_types(value) -> tuple[str, ...]:
  """`"sigmoid,sft"` (or a sequence of names) -> ("sigmoid", "sft"); unknown names refused."""
  names = tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else tuple(value)
  allowed = ", ".join(repr(t) for t in LOSS_TYPES)
  bad = [n for n in names if n not in LOSS_TYPES]
  if not names or bad:
    which = f" ({bad[0]!r} is not one)" if len(names) > 1 and bad else ""
    raise ConfigError(f"config.dpo.loss_type={value!r}: expected one of {allowed}, or several joined by commas "
                      f"(e.g. 'sigmoid,sft'){which}")
  return names


def parse_loss_weights(value, n_types: int) -> tuple[float, ...]:
  """`"1,0.5"` (or a sequence of numbers) -> (1.0, 0.5); "" / () = one weight of 1 per loss type."""
  if isinstance(value, str):
    parts = [s.strip() for s in value.split(",")] if value.strip() else []
    try:
      weights = tuple(float(p) for p in parts)
    except ValueError:
      raise ConfigError(f"config.dpo.loss_weights={value!r}: expected numbers joined by commas, e.g. '1,0.5'") from None
  else:
    weights = tuple(float(w) for w in value)
  if not weights:
    return (1.0,) * n_types
  if len(weights) != n_types:
    # TRL's DPOConfig: "`loss_weights` must have the same length as `loss_type` ..."
    raise ConfigError(f"config.dpo.loss_weights={value!r}: must have the same length as config.dpo.loss_type when "
                      f"combining multiple losses. Got {len(weights)} weights for {n_types} loss types.")
  return weights


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
  """Hyperparameters of the preference loss (TRL 1.16's names and meanings).

  Attributes:
    loss_type: a loss type or several joined by commas (see `LOSS_TYPES`).
    loss_weights: one weight per loss type ("1,0.5" or a tuple); empty = all 1.
    beta: the KL-penalty strength (IPO's tau).
    label_smoothing: robust / exo_pair / aot / aot_unpaired epsilon; cDPO on sigmoid.
    rpo_alpha: weight of an extra "sft" term (jaxdpo's older name for `sigmoid,sft`).
    reference_free: the reference log-probs are taken as 0.
    ld_alpha: LD-DPO's weight of the completion tokens past the shorter completion's length;
      1 = off (TRL's None).
    f_divergence_type: the f-DPO regulariser (`F_DIVERGENCES`).
    f_alpha_divergence_coef: alpha of `alpha_divergence`.
    discopop_tau: DiscoPOP's temperature.
  """

  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  rpo_alpha: float = 0.0
  reference_free: bool = False
  loss_weights: tuple[float, ...] | str = ()
  ld_alpha: float = 1.0
  f_divergence_type: str = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5
  discopop_tau: float = 0.05

  def __post_init__(self):
    types = parse_loss_types(self.loss_type)
    object.__setattr__(self, "loss_weights", parse_loss_weights(self.loss_weights, len(types)))
    if self.beta <= 0:
      raise ConfigError(f"config.dpo.beta={self.beta}: must be > 0")
    eps = self.label_smoothing
    if "robust" in types and not 0.0 <= eps < 0.5:
      raise ConfigError(f"config.dpo.label_smoothing={eps}: must be in [0, 0.5) for the robust loss")
    if not 0.0 <= eps <= 0.5:
      raise ConfigError(f"config.dpo.label_smoothing={eps}: must be in [0, 0.5]")
    if "exo_pair" in types and eps == 0.0:
      raise ConfigError("config.dpo.label_smoothing=0.0: label smoothing must be greater than 0.0 when using the "
                        "'exo_pair' loss. The EXO paper recommends a value of 1e-3.")
    if eps and not set(types) & set(LABEL_SMOOTHED):
      # hinge, ipo, ... have no label-smoothing term; training on would silently ignore it.
      raise ConfigError(f"config.dpo.label_smoothing={eps} has no effect on the {self.loss_type!r} loss; it applies "
                        f"to {LABEL_SMOOTHED} only (set it to 0)")
    if self.rpo_alpha < 0:
      raise ConfigError(f"config.dpo.rpo_alpha={self.rpo_alpha}: must be >= 0")
    if self.rpo_alpha and "sft" in types:
      raise ConfigError(f"config.dpo.rpo_alpha={self.rpo_alpha} with 'sft' in config.dpo.loss_type="
                        f"{self.loss_type!r}: both add the NLL term; set its weight in config.dpo.loss_weights "
                        "and rpo_alpha=0")
    if not 0.0 <= self.ld_alpha <= 1.0:
      raise ConfigError(f"config.dpo.ld_alpha={self.ld_alpha}: must be in [0, 1] (1 = no length desensitisation, "
                        "0 = tokens past the shorter completion's length are masked)")
    if self.f_divergence_type not in F_DIVERGENCES:
      raise ConfigError(f"config.dpo.f_divergence_type={self.f_divergence_type!r}: expected one of "
                        f"{', '.join(repr(f) for f in F_DIVERGENCES)}")
    if self.f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSS_TYPES):
      raise ConfigError(
          f"config.dpo.f_divergence_type={self.f_divergence_type!r} is only supported for the loss types "
          f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; config.dpo.loss_type={self.loss_type!r}. The f-DPO "
          "reparameterization leaves a beta*log Z(x) term that only cancels in the chosen-rejected reward "
          "difference, so the other losses have no valid f-divergence generalization: use the default "
          "'reverse_kl' with them.")
    if "discopop" in types and self.discopop_tau <= 0:
      raise ConfigError(f"config.dpo.discopop_tau={self.discopop_tau}: must be > 0")

  @property
  def types(self) -> tuple[str, ...]:
    """The loss types, in order."""
    return parse_loss_types(self.loss_type)

  @property
  def sft_weight(self) -> float:
    """The weight of the NLL-on-chosen term: the 'sft' entries' weights plus `rpo_alpha`."""
    return sum(w for t, w in zip(self.types, self.loss_weights) if t == "sft") + self.rpo_alpha

  @property
  def sorts_batch(self) -> bool:
    """Whether a loss type sorts across the batch (aot, aot_unpaired)."""
    return bool(set(self.types) & set(BATCH_SORTED))


def check_grad_accum(cfg: DPOLossConfig, grad_accum: int) -> None:
  """Refuses a batch-sorting loss (aot, aot_unpaired) with `train.grad_accum` > 1.

  jaxdpo's accumulation is exact: the micro-batches' shares sum to the whole batch's loss. AOT
  sorts the log-ratios over the batch, so a micro-batch sorted on its own gives another loss.
  """
  if grad_accum > 1 and cfg.sorts_batch:
    raise ConfigError(f"config.train.grad_accum={grad_accum} with config.dpo.loss_type={cfg.loss_type!r}: aot and "
                      "aot_unpaired sort the log-ratios over the whole batch, which micro-batches cannot reproduce "
                      "exactly; set config.train.grad_accum=1 (lower train.batch_size if memory is short)")
