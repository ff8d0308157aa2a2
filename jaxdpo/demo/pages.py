"""Rendered pages with the structure that makes OCR models loop, in three disjoint splits.

A page is a few lines of words from `script.WORDS`, laid out one glyph per cell on a fixed
canvas of `PageSpec.cols` x `PageSpec.rows` cells (so every page has the same size and the
vision budget, hence the compiled programs, are shared by all). Its transcription is the lines
joined by `script.LINE_BREAK`.

Blocks a page is built from (each is what real documents have and what OCR models loop on):
  run          a word repeated `run_len` times ("oak oak oak oak oak")
  list         lines sharing a head word ("map fig", "map dew", "map ink")
  table        rows with the same column pattern ("ash 3 3", as word columns that repeat)
  repeat       the same line two or more times
  prefix       items sharing a two-word prefix ("rye gem jam", "rye gem cob")
Harder splits use longer runs and more repeated lines than the SFT split (see `SPLITS`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from jaxdpo.demo import script

BLOCKS = ("run", "list", "table", "repeat", "prefix", "plain")


@dataclasses.dataclass(frozen=True)
class PageSpec:
  """How one split's pages are drawn.

  Attributes:
    cols, rows: canvas size in glyph cells (the canvas is the same for every split).
    min_lines, max_lines: lines per page.
    run_len: (min, max) length of a run of one repeated word.
    repeat_times: (min, max) copies of a repeated line.
    blocks: which block kinds appear, drawn uniformly.
  """

  cols: int = 8
  rows: int = 6
  min_lines: int = 2
  max_lines: int = 4
  run_len: tuple[int, int] = (2, 4)
  repeat_times: tuple[int, int] = (2, 2)
  blocks: tuple[str, ...] = BLOCKS


def _words(rng, k: int) -> list[str]:
  return [script.WORDS[i] for i in rng.randint(0, len(script.WORDS), k)]


def _block(rng, kind: str, spec: PageSpec, room: int) -> list[list[str]]:
  """Lines (lists of words) of one block, at most `room` lines, each at most `spec.cols` words."""
  c = spec.cols
  if kind == "run":
    n = rng.randint(spec.run_len[0], spec.run_len[1] + 1)
    lead = _words(rng, rng.randint(0, max(1, c - n) + 1) if n < c else 0)[:max(0, c - n)]
    return [(lead + [_words(rng, 1)[0]] * n)[:c]]
  if kind == "list":
    head = _words(rng, 1)
    return [head + _words(rng, rng.randint(1, c)) for _ in range(min(room, rng.randint(2, 4)))]
  if kind == "table":
    cells = rng.randint(2, c // 2 + 1)
    col_words = _words(rng, cells)
    return [[w if rng.rand() < 0.6 else _words(rng, 1)[0] for w in col_words] * 2
            for _ in range(min(room, rng.randint(2, 4)))]
  if kind == "repeat":
    line = _words(rng, rng.randint(2, c + 1))
    return [list(line) for _ in range(min(room, rng.randint(spec.repeat_times[0], spec.repeat_times[1] + 1)))]
  if kind == "prefix":
    prefix = _words(rng, 2)
    return [prefix + _words(rng, rng.randint(1, c - 1)) for _ in range(min(room, rng.randint(2, 4)))]
  return [_words(rng, rng.randint(2, c + 1))]


def make_page(rng, spec: PageSpec) -> list[list[str]]:
  """One page: `min_lines..max_lines` lines from random blocks, cut to the canvas."""
  want = rng.randint(spec.min_lines, min(spec.max_lines, spec.rows) + 1)
  lines: list[list[str]] = []
  while len(lines) < want:
    kind = spec.blocks[rng.randint(len(spec.blocks))]
    lines += _block(rng, kind, spec, want - len(lines))
  return [line[:spec.cols] for line in lines[:want]]


def transcription(lines: list[list[str]]) -> str:
  return f" {script.LINE_BREAK} ".join(" ".join(line) for line in lines)


def render(lines: list[list[str]], spec: PageSpec) -> Image.Image:
  """The page as an RGB image, one glyph per `script.CELL`-pixel cell, black on white."""
  cell = script.CELL
  ink = np.zeros((spec.rows * cell, spec.cols * cell), bool)
  table = script.glyphs()
  for r, line in enumerate(lines):
    for c, word in enumerate(line):
      ink[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = table[word]
  pixels = np.where(ink, 0, 255).astype(np.uint8)
  return Image.fromarray(np.stack([pixels] * 3, axis=-1), "RGB")


# The SFT pages are easier (short runs, lines repeated exactly twice); mining and held-out pages have
# the same mix of blocks with longer runs and more repeats: where trained OCR models loop. Both use
# every row of the canvas (SFT 2-6 lines, the others 3-6): with SFT pages of at most 4 lines, the
# converged reader could not read rows 5-6 and stopped early there (BUILD_NOTES, issue 15, e3 vs e4),
# so "harder" would have meant "rows never trained on" rather than "more repeated structure".
EASY = PageSpec(min_lines=2, max_lines=6, run_len=(2, 4), repeat_times=(2, 2))
HARD = PageSpec(min_lines=3, max_lines=6, run_len=(5, 8), repeat_times=(3, 5))
SPLITS = {"sft": EASY, "mine": HARD, "heldout": HARD}
PROMPT = "transcribe :"


def write_splits(out_dir: str, sizes: dict[str, int], *, seed: int, specs: dict[str, PageSpec] | None = None
                 ) -> dict[str, str]:
  """Renders the three splits into `out_dir` (PNG pages + one JSONL per split); returns the paths.

  SFT records are {"prompt", "completion", "images"}; mine and held-out records are {"prompt",
  "reference", "images"}. No page text and no line occurs in two splits: a page whose text or any
  of whose lines another split already holds is drawn again, so a split never tests what another
  trained on.

  Args:
    out_dir: directory for `pages/<split>_<i>.png` and `<split>.jsonl`.
    sizes: pages per split, e.g. {"sft": 2000, "mine": 400, "heldout": 400}.
    seed: seeds every split's page stream.
    specs: per-split `PageSpec` (default `SPLITS`).
  """
  specs = specs or SPLITS
  os.makedirs(os.path.join(out_dir, "pages"), exist_ok=True)
  owner: dict[str, str] = {}  # line text -> split that holds it
  paths = {}
  for split_id, split in enumerate(("sft", "mine", "heldout")):
    rng = np.random.RandomState([seed, split_id])
    rows, texts = [], set()
    while len(rows) < sizes[split]:
      lines = make_page(rng, specs[split])
      text = transcription(lines)
      line_texts = {" ".join(line) for line in lines}
      if text in texts or any(owner.get(t, split) != split for t in line_texts):
        continue
      texts.add(text)
      for t in line_texts:
        owner[t] = split
      name = f"pages/{split}_{len(rows)}.png"
      render(lines, specs[split]).save(os.path.join(out_dir, name))
      field = "completion" if split == "sft" else "reference"
      rows.append({"prompt": PROMPT, field: text, "images": [name]})
    paths[split] = os.path.join(out_dir, f"{split}.jsonl")
    with open(paths[split], "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return paths
