"""Atomic JSON / JSONL writers (process 0 writes; a crash never leaves half a file)."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def write_jsonl(path: str, rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
