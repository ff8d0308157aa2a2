"""The demo's page specs: per-split canvases and degraded renderings (jaxdpo/demo/pages.py), fast."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from jaxdpo.demo import pages, script


def _ink(img: Image.Image) -> np.ndarray:
  return np.asarray(img)[..., 0]


LINES = [["oak", "oak", "fig"], ["ash", "bay"]]


def test_clean_render_is_the_glyph_table():
  spec = pages.PageSpec(cols=4, rows=3)
  px = _ink(pages.render(LINES, spec))
  assert px.shape == (3 * script.CELL, 4 * script.CELL) and set(np.unique(px)) <= {0, 255}
  g = script.glyphs()
  assert np.array_equal(px[:8, :8] == 0, g["oak"]) and np.array_equal(px[8:16, 8:16] == 0, g["bay"])
  assert not (px[16:] == 0).any() and not (px[:, 24:] == 0).any()  # empty cells stay paper


def test_noise_flips_about_the_given_share_and_contrast_greys_the_ink():
  clean = _ink(pages.render(LINES, pages.PageSpec(cols=16, rows=12))) == 0
  noisy = _ink(pages.render(LINES, pages.PageSpec(cols=16, rows=12, noise=0.1), np.random.RandomState(0))) == 0
  share = float(np.mean(clean != noisy))
  assert 0.08 < share < 0.12, share
  faint = _ink(pages.render(LINES, pages.PageSpec(cols=4, rows=3, contrast=0.25)))
  assert set(np.unique(faint)) == {255, round(255 * 0.75)}
  assert np.array_equal(faint < 255, _ink(pages.render(LINES, pages.PageSpec(cols=4, rows=3))) == 0)
  with pytest.raises(ValueError, match="needs an rng"):
    pages.render(LINES, pages.PageSpec(noise=0.1))
  for bad in ({"noise": 0.5}, {"noise": -0.1}, {"contrast": 0.0}, {"contrast": 1.5}, {"min_lines": 3, "max_lines": 2}):
    with pytest.raises(ValueError, match="PageSpec"):
      pages.PageSpec(**bad)


def test_splits_get_their_own_canvas_and_stay_disjoint(tmp_path):
  small = pages.PageSpec(cols=4, rows=3, min_lines=1, max_lines=3)
  tall = dataclasses.replace(small, rows=7, min_lines=5, max_lines=7, noise=0.05)
  paths = pages.write_splits(str(tmp_path), {"sft": 60, "mine": 20, "heldout": 20}, seed=3,
                             specs={"sft": small, "mine": tall, "heldout": tall})
  rows = {s: [json.loads(line) for line in open(p)] for s, p in paths.items()}
  for split, spec in (("sft", small), ("mine", tall), ("heldout", tall)):
    for r in rows[split]:
      assert Image.open(tmp_path / r["images"][0]).size == (spec.cols * script.CELL, spec.rows * script.CELL)
    field = "completion" if split == "sft" else "reference"
    n_lines = [len(r[field].split(script.LINE_BREAK)) for r in rows[split]]
    assert spec.min_lines <= min(n_lines) and max(n_lines) <= spec.max_lines
  assert max(len(r["reference"].split(script.LINE_BREAK)) for r in rows["heldout"]) > small.rows
  lines = {s: {t.strip() for r in rs for t in r["completion" if s == "sft" else "reference"].split("|")}
           for s, rs in rows.items()}
  assert not lines["sft"] & lines["mine"] and not lines["sft"] & lines["heldout"] and not lines["mine"] & lines["heldout"]
  # Noise has its own stream: the same seed draws the same page texts with and without it.
  again = pages.write_splits(str(tmp_path / "clean"), {"sft": 60, "mine": 20, "heldout": 20}, seed=3,
                             specs={"sft": small, "mine": dataclasses.replace(tall, noise=0.0),
                                    "heldout": dataclasses.replace(tall, noise=0.0)})
  assert [json.loads(line)["reference"] for line in open(again["heldout"])] == [r["reference"] for r in rows["heldout"]]
  assert pages.PageSpec(cols=8, rows=10).pixels == 80 * script.CELL ** 2


def test_alternate_block_takes_turns_and_blocks_are_validated():
  spec = pages.PageSpec(cols=4, rows=12, min_lines=12, max_lines=12, repeat_times=(12, 12), blocks=("alternate",))
  lines = pages.make_page(np.random.RandomState(1), spec)
  assert len(lines) == 12 and lines[0] != lines[1]
  assert all(lines[i] == lines[i % 2] for i in range(12)) and all(1 <= len(w) <= 4 for w in lines)
  with pytest.raises(ValueError, match="PageSpec.blocks"):
    pages.PageSpec(blocks=("run", "spiral"))
  with pytest.raises(ValueError, match="PageSpec.blocks"):
    pages.PageSpec(blocks=())


def test_half_cell_offset_makes_every_merged_token_a_bigram(tmp_path):
  """x_offset_px = 4: token j of a line is [right half of glyph j - 1 | left half of glyph j], blank at the ends."""
  half = script.CELL // 2
  spec = pages.PageSpec(cols=4, rows=3, x_offset_px=half)
  px = _ink(pages.render(LINES, spec)) == 0
  assert px.shape == (3 * script.CELL, 5 * script.CELL) and spec.pixels == px.size
  g = script.glyphs()
  blank = np.zeros((script.CELL, half), bool)
  line = LINES[0]
  for j in range(len(line) + 1):
    token = px[:script.CELL, j * script.CELL:(j + 1) * script.CELL]
    right = g[line[j - 1]][:, half:] if j > 0 else blank
    left = g[line[j]][:, :half] if j < len(line) else blank
    assert np.array_equal(token, np.concatenate([right, left], axis=1)), j
  assert not px[:, (len(line) + 1) * script.CELL:][:script.CELL].any()
  # The chain is readable: no two words share a left half or a right half, and no half is blank.
  for side in (slice(0, half), slice(half, None)):
    halves = {g[w][:, side].tobytes() for w in script.WORDS}
    assert len(halves) == len(script.WORDS) and all(g[w][:, side].any() for w in script.WORDS)
  # The processor keeps the wider canvas unresized: 2 x 2 patches of 4 px per cell, one cell more.
  from jaxdpo.demo import tokenizer as demo_tokenizer
  from transformers import AutoImageProcessor
  path = demo_tokenizer.write(str(tmp_path / "tok"), patch_size=4, merge_size=2, temporal_patch_size=2,
                              min_pixels=spec.pixels, max_pixels=spec.pixels)
  out = AutoImageProcessor.from_pretrained(path)(images=[pages.render(LINES, spec)], return_tensors="np")
  assert out["image_grid_thw"].tolist() == [[1, 3 * 2, 5 * 2]]
  assert pages.PageSpec(cols=4, rows=3).pixels == 4 * 3 * script.CELL ** 2  # no offset: the old canvas
  for bad in (-1, script.CELL):
    with pytest.raises(ValueError, match="PageSpec.x_offset_px"):
      pages.PageSpec(x_offset_px=bad)
