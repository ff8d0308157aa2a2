"""Resuming a training run with a different config: refused, unless the changed keys are safe.

A re-run in a workdir that holds checkpoints continues the run saved there. If its config
differs from that run's `DIR/config.json`, the checkpoint and the new config disagree (another
batch size or learning rate would give a run that matches neither), so the job stops and lists
the changed keys. Keys that only control the run, not its result, may differ freely; keys in
`SAFE_WITH_OVERRIDE` may differ when named in `--config.train.allow_changed=KEY,KEY` (or
`=safe` for all of them); any other change needs a new workdir.

A key that the saved config lacks and that the current one holds at its default is not a change:
the run was started by an older jaxdpo, before the key existed, and every added key defaults to
the behaviour from before it (an upgrade must not strand a run half-way).
"""

from __future__ import annotations

import json
import os

from jaxdpo.errors import ConfigError
from jaxdpo.jobs import defaults

TRAINING_JOBS = ("dpo", "sft")

# Run control: how far to go this time, what to print; the trajectory does not depend on them.
ALWAYS_ALLOWED = frozenset({
    "train.stop_at_step", "train.progress", "train.debug_sigterm_step", "train.straggler_factor",
    "train.device_memory_gb", "train.allow_changed", "train.tensorboard", "train.debug_nonfinite_step",
})
# Change what is logged, kept or evaluated, or how long the run goes on; the steps already taken stay valid.
# (`train.remat` / `train.scan_layers` / `train.stacked_params` change memory and speed; the values agree with the
# plain loop to rounding; checkpoints hold the per-layer layout either way.)
# (`num_steps` also stretches a decaying learning-rate schedule from the resumed step on.)
SAFE_WITH_OVERRIDE = frozenset({
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
    "train.max_to_keep", "train.degeneration_eval_every", "data.eval", "data.degeneration_eval",
    "train.on_nonfinite", "train.remat", "train.scan_layers", "train.stacked_params",
})


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def changed_keys(saved: dict, current: dict, added_defaults: dict | None = None) -> dict[str, tuple]:
  """{dotted key: (saved value, current value)} for every key whose value differs.

  Args:
    saved: the config the run was started with.
    current: the config of this invocation.
    added_defaults: flattened defaults; a key missing from `saved` whose current value equals its
      default here counts as unchanged (a key added to jaxdpo after the run started).
  """
  a, b = flatten(saved), flatten(current)
  added_defaults = added_defaults or {}
  out = {}
  for k in sorted(set(a) | set(b)):
    if k not in a and k in added_defaults and b.get(k) == added_defaults[k]:
      continue
    if a.get(k) != b.get(k):
      out[k] = (a.get(k), b.get(k))
  return out


def _has_checkpoint(workdir: str) -> bool:
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def check(config, workdir: str) -> None:
  """Raises `ConfigError` when a training job would resume under a config that changes its result."""
  path = os.path.join(workdir, "config.json")
  if config.job not in TRAINING_JOBS or not _has_checkpoint(workdir) or not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  base = flatten(json.loads(defaults.base().to_json_best_effort()))
  changes = {k: v for k, v in changed_keys(saved, current, base).items() if k not in ALWAYS_ALLOWED}
  allowed = _allowed(config)
  refused = {k: v for k, v in changes.items() if k not in allowed}
  if not refused:
    return
  listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
  safe = sorted(k for k in refused if k in SAFE_WITH_OVERRIDE)
  unsafe = sorted(k for k in refused if k not in SAFE_WITH_OVERRIDE)
  hints = []
  if safe:
    hints.append(f"to resume anyway, add --config.train.allow_changed={','.join(safe)}")
  if unsafe:
    hints.append(f"{', '.join(unsafe)} cannot change on resume: use a new --workdir (or remove {workdir})")
  raise ConfigError(f"{workdir} holds a checkpoint of a run with another config ({path}); changed keys: "
                    f"{listing}; " + "; ".join(hints))


def _allowed(config) -> frozenset:
  spec = config.train.allow_changed.strip()
  if not spec:
    return frozenset()
  if spec == "safe":
    return SAFE_WITH_OVERRIDE
  keys = {k.strip() for k in spec.split(",") if k.strip()}
  bad = sorted(k for k in keys if k not in SAFE_WITH_OVERRIDE)
  if bad:
    raise ConfigError(f"config.train.allow_changed names {', '.join(bad)}, which cannot change on resume; "
                      f"the keys it may name: {', '.join(sorted(SAFE_WITH_OVERRIDE))} (or 'safe' for all)")
  return frozenset(keys)
