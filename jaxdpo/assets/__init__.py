"""Files shipped with the package: the tiny demo tokenizer and preference sets."""

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """Absolute path of an embedded asset (e.g. "tiny_tokenizer")."""
  return os.path.join(ASSETS_DIR, name)
