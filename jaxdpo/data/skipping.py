"""`data.skip_bad_records`: bad records are set aside and listed instead of stopping the job.

A record is bad when it fails validation, tokenization or image loading (any `DataError`
naming it), or when its JSONL line is not a JSON object. With skipping on, each one is
recorded as {"where": "file.jsonl:12", "reason": ...}; the job writes the list to
`DIR/skipped.jsonl`, counts it in the metrics and the summary, and stops when the bad share
exceeds `data.max_skip_share` (a mostly broken file is a mistake, not noise).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from jaxdpo.errors import DataError

FILE_NAME = "skipped.jsonl"


@dataclasses.dataclass
class SkipLog:
  """Bad records of one job. `enabled` False: the first bad record raises, as without the option."""

  enabled: bool = False
  entries: list[dict] = dataclasses.field(default_factory=list)

  def add(self, where: str, error: Exception):
    if not self.enabled:
      raise error
    reason = str(error)
    if reason.startswith(f"{where}: "):  # the location is its own field
      reason = reason[len(where) + 2:]
    self.entries.append({"where": where, "reason": reason})

  def attempt(self, where: str, fn: Callable[[], Any]):
    """`fn()`, or None after recording its `DataError` (re-raised when skipping is off)."""
    try:
      return fn()
    except DataError as e:
      self.add(where, e)
      return None


def check_share(log: SkipLog, source: str, total: int, max_share: float, listed_in: str, start: int = 0):
  """Refuses `source` when more than `max_share` of its `total` records were skipped.

  `start`: entries of `log` before this index belong to other sources.
  """
  bad = len(log.entries) - start
  if not log.enabled or bad == 0 or total == 0:
    return
  if bad > max_share * total:
    first = log.entries[start]
    raise DataError(f"{source}: {bad} of {total} records are bad ({bad / total:.1%}), more than "
                    f"data.max_skip_share={max_share:g}; they are listed in {listed_in} (first: {first['where']}: "
                    f"{first['reason']}). Fix the data, or raise data.max_skip_share")


def write(log: SkipLog, workdir: str) -> str | None:
  """Writes `workdir/skipped.jsonl` atomically (None when skipping is off); returns its path."""
  if not log.enabled:
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, FILE_NAME)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for e in log.entries:
      f.write(json.dumps(e) + "\n")
  os.replace(path + ".tmp", path)
  return path
