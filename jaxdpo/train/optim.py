"""Optimiser and learning-rate schedule (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdpo.errors import ConfigError


def make_schedule(kind: str, lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0):
  """Learning-rate schedule by name: "warmup_cosine" (default), "constant", "warmup_linear"."""
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1),
                                              end_value=lr * end_lr_ratio)
  if kind == "warmup_linear":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                                 optax.linear_schedule(lr, lr * end_lr_ratio, max(total_steps - warmup_steps, 1))],
                                [warmup_steps])
  raise ConfigError(f"config.optim.schedule={kind!r}; expected warmup_cosine, constant or warmup_linear")


def decay_mask(params):
  """Weight decay on matrices only: biases and norm scales are not decayed (as in HF Trainer).

  Leaves of stacked layers (`decoder.StackedParams.stacks`: [L, ...]) are judged by their per-layer
  shape, so a stacked norm scale [L, D] is still not decayed.
  """
  def keep(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    layer_axis = int(bool(path) and getattr(path[0], "name", None) == "stacks")
    return x.ndim - layer_axis >= 2 and name != "bias"
  return jax.tree_util.tree_map_with_path(keep, params)


MU_DTYPES = ("", "float32", "bfloat16")


def mu_dtype_of(name: str):
  """`optim.mu_dtype` as a dtype: "" -> None (AdamW's first moment in each parameter's dtype)."""
  if name not in MU_DTYPES:
    raise ConfigError(f"config.optim.mu_dtype={name!r}; expected '' (the parameter dtype), float32 or bfloat16")
  return jnp.dtype(name) if name else None


def make_optimizer(optim, total_steps: int):
  """AdamW with gradient clipping and a schedule, from the `config.optim` block.

  `optim.mu_dtype` (optional; "" when absent) stores AdamW's first moment in that dtype (bf16
  halves it); the second moment stays in the parameter dtype, as optax keeps it.

  Returns:
    (optax transformation, schedule function).
  """
  schedule = make_schedule(optim.schedule, optim.lr, optim.warmup_steps, total_steps, optim.end_lr_ratio)
  parts = []
  if optim.max_grad_norm and optim.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                           mask=decay_mask, mu_dtype=mu_dtype_of(optim.get("mu_dtype", ""))))
  return optax.chain(*parts), schedule
