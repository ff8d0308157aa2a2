"""Entry point: `python -m jaxdpo.main --config configs/NAME.py[:arg] --workdir DIR [--config.a.b=v ...]`.

Loads the locked ml_collections config (a misspelt override fails and names the key), writes
the resolved config to `DIR/config.json`, and runs the job named by `config.job`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

# transformers prints an advisory banner at import when torch is absent; jaxdpo never needs torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags

from jaxdpo.errors import ConfigError, UserError
from jaxdpo.jobs import resume_config, validate


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])

# Multi-host (see jaxdpo/parallel/distributed.py). On SLURM and Cloud TPU these are detected; elsewhere
# every process gets the same --coordinator and --num_processes and its own --process_id.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: join a multi-host run when flags or the environment (SLURM, Open MPI, "
                                 "Cloud TPU) say so; on: always call jax.distributed.initialize(); off: never.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Accelerator ids this process drives (GPU), "
                                      "e.g. 0,1,2,3; default: jax's choice.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300,
                                            "Seconds to wait for every process to join the coordinator.")


def _job_table():
  # Imported lazily so that `--help` and config errors do not pay for jax/transformers imports.
  from jaxdpo.jobs import dpo as dpo_job
  from jaxdpo.jobs import table as jobs_extra
  return {"dpo": dpo_job.run, **jobs_extra.JOBS}


def write_config(config, workdir: str):
  """Writes the resolved config as JSON (atomically), so the run can be reproduced."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def run(config, workdir: str):
  """Dispatches `config.job`; returns what the job returns."""
  # Every value checked before any data is read or model built: a typo costs a second, not a compile.
  validate.check(config)
  resume_config.check(config, workdir)  # before config.json is overwritten with the new config
  table = _job_table()
  if config.job not in table:
    raise ConfigError(f"unknown config.job={config.job!r}; known jobs: {sorted(table)}")
  os.makedirs(workdir, exist_ok=True)
  import jax  # noqa: F401  (after config validation)
  if jax.process_index() == 0:
    write_config(config, workdir)
  return table[config.job](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax", "jax._src.xla_bridge", "orbax", "datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxdpo.parallel import distributed
  # Before any jax computation: the backends must see the multi-host runtime when they start.
  plan = exit_on_user_error(lambda: distributed.maybe_initialize(
      mode=_DISTRIBUTED.value, coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, local_device_ids=_LOCAL_DEVICE_IDS.value, timeout_s=_DISTRIBUTED_TIMEOUT.value))
  if plan is not None:
    import jax
    if jax.process_index() != 0:
      logging.getLogger().setLevel(logging.WARNING)  # progress is logged once, by process 0
  try:
    exit_on_user_error(lambda: run(_CONFIG.value, _WORKDIR.value))
  except KeyboardInterrupt:
    sys.exit(130)  # a second Ctrl-C; the loop has said what was (not) saved


def exit_on_user_error(fn):
  """Returns `fn()`; a `UserError` becomes one line on stderr, `error: ...`, and exit status 2.

  Bad input is reported as one clear line naming the file, record or key. Every other
  exception propagates with its traceback: it is a bug, and hiding where it came from would
  make it look like the user's mistake.
  """
  try:
    return fn()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _resolve_config_arg(argv: list[str]) -> list[str]:
  """argv with the `--config` value made absolute (a path, or a config shipped in jaxdpo/configs)."""
  from jaxdpo.cli import config_paths
  out = list(argv)
  for i, a in enumerate(out):
    if a == "--config" and i + 1 < len(out):
      out[i + 1] = config_paths.resolve(out[i + 1])
    elif a.startswith("--config="):
      out[i] = "--config=" + config_paths.resolve(a[len("--config="):])
  return out


def cli(argv=None):
  """`app.run`, with config-file and override errors turned into one clear line (exit code 2)."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
    from jaxdpo.cli import help_text
    sys.stdout.write(help_text.render())
    sys.exit(0)
  try:
    argv = _resolve_config_arg(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  overrides = [a for a in argv if a.startswith("--config.")]
  try:
    # Parse once up front: errors raised while applying overrides (a misspelt key, a wrong
    # type) surface here, before any job code runs, so they can be reported precisely.
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    detail = " ".join(str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").split())
    print(f"error: invalid command line or config override ({detail})" +
          (f"; overrides given: {' '.join(overrides)}" if overrides else ""), file=sys.stderr)
    sys.exit(2)
  main(rest)


if __name__ == "__main__":
  cli()
