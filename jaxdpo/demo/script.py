"""A logographic script for the demo pages: one word, one 8x8 glyph, one vision token.

Each glyph fills exactly one merged vision token of the `demo_vl` Qwen2.5-VL preset (patch 4 px,
2x2 merge = 8 px), so the vision tower never has to segment or combine glyphs: reading a page
is telling glyphs apart and keeping one's place. The glyphs are fixed bitmaps drawn once from a
fixed seed, and kept only when every pair differs in at least `MIN_DISTANCE` pixels.
"""

from __future__ import annotations

import functools

import numpy as np

CELL = 8  # pixels per glyph side = patch_size * spatial_merge_size of the demo preset
MIN_DISTANCE = 20
LINE_BREAK = "|"  # the transcription's end-of-line token (a line ends where its glyphs end)

# 51 words: with the 13 special and prompt tokens the tokenizer has exactly 64 ids, no gaps.
WORDS = tuple("""
ash bay cob dew elm fig gum hay ink jam kit lox mud nut oak pea rye sap tin urn vat wax yam zip
arc bud cap dot eel fin gem hub ivy jet keg lid map nib orb pod rim sun tar uke vow web yew zoo
fox kin ore
""".split())
assert len(WORDS) == 51 and len(set(WORDS)) == 51


@functools.lru_cache(maxsize=1)
def glyphs() -> dict[str, np.ndarray]:
  """word -> bool [CELL, CELL] ink mask (True = black)."""
  rng = np.random.RandomState(20261202)
  out: list[np.ndarray] = []
  while len(out) < len(WORDS):
    g = rng.rand(CELL, CELL) < 0.45
    if all(np.sum(g != h) >= MIN_DISTANCE for h in out) and g.any():
      out.append(g)
  return dict(zip(WORDS, out))
