"""Entry point: `python -m jaxdpo.main --config configs/NAME.py[:arg] --workdir DIR [--config.a.b=v ...]`.

Loads the locked ml_collections config (a misspelt override fails and names the key), writes
the resolved config to `DIR/config.json`, and runs the job named by `config.job`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def _job_table():
  # Imported lazily so that `--help` and config errors do not pay for jax/transformers imports.
  from jaxdpo.dpo import job as dpo_job
  table = {"dpo": dpo_job.run}
  try:
    from jaxdpo import jobs_extra  # sft / eval / mine, when present
    table.update(jobs_extra.JOBS)
  except ImportError:
    pass
  return table


def write_config(config, workdir: str):
  """Writes the resolved config as JSON (atomically), so the run can be reproduced."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def run(config, workdir: str):
  """Dispatches `config.job`; returns what the job returns."""
  table = _job_table()
  if config.job not in table:
    raise ValueError(f"unknown config.job={config.job!r}; known jobs: {sorted(table)}")
  os.makedirs(workdir, exist_ok=True)
  import jax  # noqa: F401  (after config validation)
  if jax.process_index() == 0:
    write_config(config, workdir)
  return table[config.job](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Bad input of any kind: one clear line naming the file/record/key, no traceback noise.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def cli(argv=None):
  """`app.run` with config-override errors turned into one clear line (exit code 2)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    app.run(main, argv)
  except (AttributeError, KeyError, TypeError) as e:
    overrides = [a for a in argv if a.startswith("--config.")]
    if not overrides:
      raise
    detail = " ".join(str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").split())
    print(f"error: invalid config override ({detail}); overrides given: {' '.join(overrides)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli()
