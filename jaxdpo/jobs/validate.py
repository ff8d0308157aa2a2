"""Every config value checked before any data is read or any model is built or compiled.

A typo (`dpo.loss_type=sigmod`) or an impossible setting (a batch that the accumulation
cannot split, a step budget of zero) costs a second, not a compile: `check(config)` runs first
in `python -m jaxdpo.main`, and raises a `ConfigError` naming the key, the value and what it may be.
"""

from __future__ import annotations

from jaxdpo.data import shared_rows
from jaxdpo.errors import ConfigError

JOBS = ("dpo", "sft", "eval", "mine", "demo", "ref_logps")
DTYPES = ("float32", "bfloat16")
TRUNCATION = ("keep_end", "keep_start", "off")
REFERENCES = ("model", "cached")
SCHEDULES = ("warmup_cosine", "constant", "warmup_linear")
ATTENTION = ("", "xla", "cudnn")
MINE_CHOSEN = ("reference", "best_sample")
MINE_REJECTED = ("degenerate", "worst_cer")
ON_NONFINITE = ("stop", "skip")
STACKED_PARAMS = ("auto", "on", "off")  # train.stacked_params


def _one_of(config, key: str, allowed):
  value = _get(config, key)
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}")


def _at_least(config, key: str, low, *, note: str = ""):
  value = _get(config, key)
  if value < low:
    raise ConfigError(f"config.{key}={value!r}: must be >= {low}{note}")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _has(config, key: str) -> bool:
  try:
    _get(config, key)
    return True
  except (KeyError, AttributeError):
    return False


def check(config) -> None:
  """Raises `ConfigError` for the first config value that no job could run with."""
  _one_of(config, "job", JOBS)
  _one_of(config, "model.param_dtype", DTYPES)
  _one_of(config, "model.compute_dtype", DTYPES)
  _one_of(config, "model.attention_impl", ATTENTION)
  if not config.model.checkpoint:
    from jaxdpo.models import registry  # cheap: no model is built
    families = registry.families()
    if config.model.family not in families:
      raise ConfigError(f"config.model.family={config.model.family!r}: expected one of {sorted(families)} "
                        "(or set config.model.checkpoint)")
    presets = families[config.model.family].presets
    if config.model.preset not in presets:
      raise ConfigError(f"config.model.preset={config.model.preset!r} is not a {config.model.family} preset; "
                        f"expected one of {sorted(presets)}")
  _check_lora(config)
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size}: expected a positive size or -1 (the rest)")
  if [config.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
    raise ConfigError("config.mesh: at most one axis may be -1 (the rest)")
  _one_of(config, "data.truncation", TRUNCATION)
  _one_of(config, "data.layout", shared_rows.LAYOUTS)
  _at_least(config, "data.pack_tokens", 0)
  if config.data.pack_tokens and config.data.layout != "shared":
    raise ConfigError(f"config.data.pack_tokens={config.data.pack_tokens} packs prefix-shared rows: set "
                      f"config.data.layout=shared (it is {config.data.layout!r})")
  _at_least(config, "data.max_length", 2)
  _at_least(config, "data.max_prompt_length", 0)
  if config.data.max_prompt_length >= config.data.max_length:
    raise ConfigError(f"config.data.max_prompt_length={config.data.max_prompt_length}: must be below "
                      f"config.data.max_length={config.data.max_length} (0 = half of it)")
  if config.job in ("dpo", "sft", "ref_logps") and not config.data.train:
    raise ConfigError(f"config.data.train is empty: the {config.job} job needs training records")
  if config.job in ("eval", "mine") and not config.data.prompts:
    raise ConfigError(f"config.data.prompts is empty: the {config.job} job needs prompt records")
  if config.job in ("dpo", "ref_logps"):  # the other jobs never read dpo.*; a stray value there must not stop them
    _check_dpo(config)
  _check_optim(config)
  _check_train(config)
  _check_generation(config)


def _check_lora(config):
  from jaxdpo.models import lora  # cheap: builds nothing
  cfg = lora.from_config(config.lora)
  if not cfg.enabled:
    return
  if config.job not in ("dpo", "sft"):
    raise ConfigError(f"config.lora.rank={cfg.rank} with job={config.job!r}: LoRA trains in the dpo and sft jobs "
                      "only (set config.lora.rank=0)")
  if config.model.trainable not in ("all", "language"):
    raise ConfigError(f"config.model.trainable={config.model.trainable!r} with config.lora.rank={cfg.rank}: with "
                      "LoRA only the adapters train; choose the adapted modules with config.lora.targets")


def _check_dpo(config):
  from jaxdpo.jobs import dpo  # the loss settings are checked where they are built: one set of rules
  from jaxdpo.objectives import loss_config
  if not config.dpo.reference.startswith("cache:"):
    _one_of(config, "dpo.reference", REFERENCES + ("cache:PATH",))
  elif config.dpo.reference == "cache:":
    raise ConfigError("config.dpo.reference='cache:': expected cache:PATH (a file written by job=ref_logps)")
  loss_config.check_grad_accum(dpo.loss_config(config), config.train.grad_accum)


def _check_optim(config):
  _one_of(config, "optim.schedule", SCHEDULES)
  if config.optim.lr <= 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr}: must be > 0")
  _at_least(config, "optim.warmup_steps", 0)
  _at_least(config, "optim.weight_decay", 0.0)
  _at_least(config, "optim.max_grad_norm", 0.0, note=" (0 = no clipping)")
  if _has(config, "optim.mu_dtype"):
    _one_of(config, "optim.mu_dtype", ("",) + DTYPES)
  for key in ("optim.b1", "optim.b2", "optim.end_lr_ratio"):
    value = _get(config, key)
    if not 0.0 <= value <= 1.0:
      raise ConfigError(f"config.{key}={value}: must be in [0, 1]")


def _check_train(config):
  t = config.train
  _at_least(config, "train.num_steps", 1)
  _at_least(config, "train.batch_size", 1)
  _at_least(config, "train.grad_accum", 1)
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by "
                      f"config.train.grad_accum={t.grad_accum}")
  _at_least(config, "train.log_every", 1)
  for key in ("train.ckpt_every", "train.eval_every", "train.degeneration_eval_every", "train.eval_batches",
              "train.max_to_keep", "train.straggler_factor"):
    _at_least(config, key, 0)
  if t.stop_at_step != -1 and t.stop_at_step < 1:
    raise ConfigError(f"config.train.stop_at_step={t.stop_at_step}: expected a step >= 1, or -1 (run to num_steps)")
  _at_least(config, "train.logprob_chunk", 1)
  if _has(config, "train.remat"):
    from jaxdpo.models import remat  # cheap: builds nothing
    _one_of(config, "train.remat", remat.POLICIES)
  if _has(config, "train.on_nonfinite"):
    _one_of(config, "train.on_nonfinite", ON_NONFINITE)
  if _has(config, "train.stacked_params"):
    _one_of(config, "train.stacked_params", STACKED_PARAMS)
    if t.stacked_params == "on" and not t.get("scan_layers", False):
      raise ConfigError("config.train.stacked_params='on' needs config.train.scan_layers=True: the stacked layers "
                        "are what the layer scan reads (use 'auto' or 'off')")


def _check_generation(config):
  g = config.generate
  for key in ("generate.max_new_tokens", "generate.max_prompt_length", "generate.batch_size", "mine.num_samples",
              "generate.chunk_batches"):
    _at_least(config, key, 1)
  for key in ("generate.temperature", "mine.temperature", "generate.top_k", "mine.top_k"):
    _at_least(config, key, 0)
  for key in ("generate.top_p", "mine.top_p"):
    value = _get(config, key)
    if not 0.0 < value <= 1.0:
      raise ConfigError(f"config.{key}={value}: must be in (0, 1]")
  del g
  _one_of(config, "mine.chosen", MINE_CHOSEN)
  _one_of(config, "mine.rejected", MINE_REJECTED)


def check_dataset_size(num_examples: int, batch_size: int, source: str, what: str = "records") -> None:
  """Refuses a data set smaller than one global batch (found right after tokenizing, before the model)."""
  if num_examples < batch_size:
    raise ConfigError(f"{source}: only {num_examples} {what}, fewer than config.train.batch_size={batch_size}; "
                      "lower the batch size or add data")
