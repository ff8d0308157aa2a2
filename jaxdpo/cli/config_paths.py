"""Where `--config` points: a config file given by path, or one shipped in `jaxdpo/configs/`.

A shipped config can be named from any directory, as `tiny_dpo.py` or `configs/tiny_dpo.py`
(the repository's spelling), with the usual optional `:arg` suffix. A path that exists always
wins, so a user's own `configs/tiny_dpo.py` is never shadowed by the packaged one.
"""

from __future__ import annotations

import ast
import os

from jaxdpo.errors import ConfigError

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped() -> dict[str, str]:
  """{file name: first line of its docstring} for every config shipped with the package."""
  out = {}
  for name in sorted(os.listdir(SHIPPED_DIR)):
    if name.endswith(".py") and not name.startswith("_"):
      with open(os.path.join(SHIPPED_DIR, name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
      out[name] = doc.strip().splitlines()[0] if doc.strip() else ""
  return out


def split_arg(value: str) -> tuple[str, str | None]:
  """`path.py:arg` -> (`path.py`, `arg`); the argument may itself hold colons (`:gs://...`)."""
  head, sep, tail = value.partition(".py:")
  if sep:
    return head + ".py", tail
  return value, None


def resolve(value: str) -> str:
  """The `--config` value with its file made absolute: an existing path, else a shipped config.

  Raises:
    ConfigError: naming the file, and the shipped configs, when neither exists.
  """
  path, arg = split_arg(value)
  if os.path.isfile(path):
    found = os.path.abspath(path)
  else:
    candidate = os.path.join(SHIPPED_DIR, os.path.basename(path))
    under_configs = os.path.dirname(os.path.normpath(path)) in ("", "configs")
    if not (under_configs and path.endswith(".py") and os.path.isfile(candidate)):
      raise ConfigError(f"--config {value}: no such config file {path!r} (from {os.getcwd()}); shipped configs: "
                        f"{', '.join(shipped())} (see python -m jaxdpo.main --help)")
    found = candidate
  return found if arg is None else f"{found}:{arg}"
