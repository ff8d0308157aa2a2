"""Rendered pages with the structure that makes OCR models loop, in three disjoint splits.

A page is a few lines of words from `script.WORDS`, laid out one glyph per cell on a canvas of
`PageSpec.cols` x `PageSpec.rows` cells. Every page of a split has the same canvas (so within a
split the vision budget, hence the compiled programs, are shared); splits may differ (a taller
canvas for the mine and held-out pages: more lines than any SFT page holds). A split's pages
may also be degraded (`PageSpec.noise`, `PageSpec.contrast`) so that the visual evidence is weak.
Its transcription is the lines joined by `script.LINE_BREAK`.

Blocks a page is built from (each is what real documents have and what OCR models loop on):
  run          a word repeated `run_len` times ("oak oak oak oak oak")
  list         lines sharing a head word ("map fig", "map dew", "map ink")
  table        rows with the same column pattern ("ash 3 3", as word columns that repeat)
  repeat       the same line two or more times
  prefix       items sharing a two-word prefix ("rye gem jam", "rye gem cob")
  alternate    two lines taking turns ("oak fig", "ash bay", "oak fig", ...), `repeat_times` lines
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
ALL_BLOCKS = BLOCKS + ("alternate",)


@dataclasses.dataclass(frozen=True)
class PageSpec:
  """How one split's pages are drawn.

  Attributes:
    cols, rows: canvas size in glyph cells (the same for every page of a split).
    min_lines, max_lines: lines per page.
    run_len: (min, max) length of a run of one repeated word.
    repeat_times: (min, max) copies of a repeated line.
    blocks: which block kinds appear, drawn uniformly.
    line_words: most words on a line (0: `cols`). Fewer than `cols` leaves room for `gaps`.
    gaps: most blank cells put into a line (before or between its words, at random slots, as
      far as the line leaves room): with gaps a word's index on its line no longer gives its
      column, so a reader must find its place by what it has read (layout jitter).
    row_gaps: most blank rows put before or between the lines, likewise for the line index.
    noise: probability that a pixel of the page is flipped (ink <-> paper), in [0, 0.5).
    contrast: ink-to-paper difference in (0, 1]; 1 is black on white, lower is grey on grey
      (paper stays at the top of the range, so faint pages are light, not dark).
    x_offset_px: every glyph drawn this many pixels right of its cell, in [0, CELL); the canvas
      is then one cell wider. With half a cell (4 px = one patch of `demo_vl`) each 8-px merged
      vision token holds [right half of glyph i | left half of glyph i + 1]: a bigram, so a reader
      without horizontal position has to chain tokens by content (BUILD_NOTES, issue 15, e18).
  """

  cols: int = 8
  rows: int = 6
  min_lines: int = 2
  max_lines: int = 4
  run_len: tuple[int, int] = (2, 4)
  repeat_times: tuple[int, int] = (2, 2)
  blocks: tuple[str, ...] = BLOCKS
  line_words: int = 0
  gaps: int = 0
  row_gaps: int = 0
  noise: float = 0.0
  contrast: float = 1.0
  x_offset_px: int = 0

  def __post_init__(self):
    if not 0.0 <= self.noise < 0.5:
      raise ValueError(f"PageSpec.noise must be in [0, 0.5), got {self.noise}")
    if not 0.0 < self.contrast <= 1.0:
      raise ValueError(f"PageSpec.contrast must be in (0, 1], got {self.contrast}")
    if not 1 <= self.min_lines <= self.max_lines:
      raise ValueError(f"PageSpec: need 1 <= min_lines <= max_lines, got {self.min_lines}, {self.max_lines}")
    if not self.blocks or set(self.blocks) - set(ALL_BLOCKS):
      raise ValueError(f"PageSpec.blocks must be a non-empty tuple of {ALL_BLOCKS}, got {self.blocks}")
    if not 0 <= self.line_words <= self.cols or min(self.gaps, self.row_gaps) < 0:
      raise ValueError(f"PageSpec: need 0 <= line_words <= cols and gaps, row_gaps >= 0, got line_words="
                       f"{self.line_words}, cols={self.cols}, gaps={self.gaps}, row_gaps={self.row_gaps}")

    if not 0 <= self.x_offset_px < script.CELL:
      raise ValueError(f"PageSpec.x_offset_px must be in [0, {script.CELL}), got {self.x_offset_px}")

  @property
  def width(self) -> int:
    """The most words on a line."""
    return self.line_words or self.cols

  @property
  def jittered(self) -> bool:
    return self.gaps > 0 or self.row_gaps > 0

  @property
  def pixels(self) -> int:
    """The canvas area in pixels (what the image processor must keep unresized)."""
    return self.width_px * self.rows * script.CELL

  @property
  def width_px(self) -> int:
    """The canvas width: one cell more with an offset, so the last glyph's right half still fits."""
    return (self.cols + (1 if self.x_offset_px else 0)) * script.CELL


def _words(rng, k: int) -> list[str]:
  return [script.WORDS[i] for i in rng.randint(0, len(script.WORDS), k)]


def _block(rng, kind: str, spec: PageSpec, room: int) -> list[list[str]]:
  """Lines (lists of words) of one block, at most `room` lines, each at most `spec.width` words."""
  c = spec.width
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
  if kind == "alternate":
    pair = [_words(rng, rng.randint(1, c + 1)) for _ in range(2)]
    n = rng.randint(spec.repeat_times[0], spec.repeat_times[1] + 1)
    return [list(pair[i % 2]) for i in range(min(room, n))]
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
  return [line[:spec.width] for line in lines[:want]]


def transcription(lines: list[list[str]]) -> str:
  return f" {script.LINE_BREAK} ".join(" ".join(line) for line in lines)


def _offsets(rng, n: int, room: int, most: int) -> list[int]:
  """Where `n` items go among `n + room` slots: up to `most` blanks dropped into random gaps."""
  blanks = rng.randint(0, min(most, room) + 1) if most > 0 else 0
  shift = np.bincount(rng.randint(0, n + 1, blanks), minlength=n + 1)[:n]  # blanks before item i
  return list(np.arange(n) + np.cumsum(shift))


def layout(lines: list[list[str]], spec: PageSpec, rng=None) -> list[tuple[int, int, str]]:
  """(row, column, word) of every glyph; with `spec.gaps` / `spec.row_gaps` blanks drawn from `rng`."""
  if spec.jittered and rng is None:
    raise ValueError("layout: PageSpec.gaps / row_gaps > 0 needs an rng")
  rows = _offsets(rng, len(lines), spec.rows - len(lines), spec.row_gaps) if spec.row_gaps else range(len(lines))
  out = []
  for r, line in zip(rows, lines):
    cols = _offsets(rng, len(line), spec.cols - len(line), spec.gaps) if spec.gaps else range(len(line))
    out += [(int(r), int(c), w) for c, w in zip(cols, line)]
  return out


def render(lines: list[list[str]], spec: PageSpec, rng=None) -> Image.Image:
  """The page as an RGB image, one glyph per `script.CELL`-pixel cell, black on white.

  With `spec.gaps` / `spec.row_gaps` the glyphs are spread out (`layout`); with `spec.noise > 0`
  each pixel flips with that probability; both draw from `rng`, required then. With
  `spec.contrast < 1` ink is grey on a white page; with `spec.x_offset_px` every glyph is shifted
  right by that many pixels on a canvas one cell wider.
  """
  cell = script.CELL
  ink = np.zeros((spec.rows * cell, spec.width_px), bool)
  table = script.glyphs()
  x0 = spec.x_offset_px
  for r, c, word in layout(lines, spec, rng):
    ink[r * cell:(r + 1) * cell, x0 + c * cell:x0 + (c + 1) * cell] = table[word]
  if spec.noise > 0:
    if rng is None:
      raise ValueError("render: PageSpec.noise > 0 needs an rng")
    ink ^= rng.rand(*ink.shape) < spec.noise
  pixels = np.where(ink, round(255 * (1.0 - spec.contrast)), 255).astype(np.uint8)
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
    specs: per-split `PageSpec` (default `SPLITS`); each split may have its own canvas.
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
      # Layout jitter and noise have their own stream, so that they never change which pages are drawn.
      noise_rng = np.random.RandomState([seed, split_id, len(rows), 1])
      render(lines, specs[split], noise_rng).save(os.path.join(out_dir, name))
      field = "completion" if split == "sft" else "reference"
      rows.append({"prompt": PROMPT, field: text, "images": [name]})
    paths[split] = os.path.join(out_dir, f"{split}.jsonl")
    with open(paths[split], "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return paths
