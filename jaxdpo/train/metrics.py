"""Metrics to stdout, `workdir/metrics.jsonl` and (optionally) TensorBoard; process 0 only."""

from __future__ import annotations

import json
import logging
import math
import os

import jax

from jaxdpo.errors import DataError

log = logging.getLogger("jaxdpo")


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl.

  On resume, lines for steps after the restored checkpoint are dropped first: those steps
  are about to be run again, and keeping both copies would double-count them.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = False):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    self.last_row: dict = {}  # the last row kept on resume
    if not self.enabled:
      return
    self.last_row: dict = {}  # the last row kept on resume
    if os.path.exists(self.path):
      kept = []
      for row, line in _rows(self.path):
        if row.get("step", 0) <= resume_step:
          kept.append(line)
          self.last_row = row
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as e:
        raise ImportError("config.train.tensorboard=True needs tensorboardX: pip install 'jaxdpo[tensorboard]'") from e
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _rows(path: str) -> list[tuple[dict, str]]:
  """(row, line) of every line of metrics.jsonl. A cut-off last line (a kill during a write) is
  dropped with a warning; a malformed line before it is an error naming the line."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  out = []
  for i, line in enumerate(lines, 1):
    try:
      out.append((json.loads(line), line if line.endswith("\n") else line + "\n"))
    except json.JSONDecodeError as e:
      if i == len(lines):
        log.warning("%s:%d: dropping a truncated last line (the previous run was killed while writing it)", path, i)
        break
      raise DataError(f"{path}:{i}: malformed metrics line ({e.msg}); fix or remove the file to resume") from e
  return out


def _scalar(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v
