"""Builds the shipped tiny vision assets for `configs/tiny_vl.py`: pages, records, tokenizer.

  python scripts/make_tiny_vl_assets.py          # rewrites jaxdpo/assets/tiny_vl/

Pages come from the demo's renderer (jaxdpo/demo/pages.py) on a small canvas, so each page is
12 merged vision tokens of the `demo_vl` preset and a job's whole sequence fits in 64 tokens.
The tokenizer dir is the demo's (jaxdpo/demo/tokenizer.py) with its Qwen2-VL image processor.
Written: sft.jsonl (prompt, completion, images), heldout.jsonl and mine.jsonl (prompt,
reference, images), pairs.jsonl (prompt, chosen = the transcription, rejected = a loop on its
first word, images) so that `tiny_vl.py:dpo` also runs on its own. Image paths are relative to
the records file.
"""

from __future__ import annotations

import json
import os
import shutil

from jaxdpo.demo import pages
from jaxdpo.demo import tokenizer as demo_tokenizer
from jaxdpo.models.qwen2_5_vl import config as qcfg

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "jaxdpo", "assets", "tiny_vl")
# 4 x 3 glyph cells = 32 x 24 px; at most 2 lines, so a transcription is <= 9 tokens + EOS and
# the tiny_vl config's generate.max_new_tokens (12) can finish it.
SPEC = pages.PageSpec(cols=4, rows=3, min_lines=1, max_lines=2, run_len=(2, 3), repeat_times=(2, 2))
SIZES = {"sft": 8, "mine": 4, "heldout": 4}
SEED = 20261202
LOOP_LEN = 12  # the rejected side's length: a degenerate sample runs to the token limit


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def build(out_dir: str = OUT) -> None:
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  paths = pages.write_splits(out_dir, SIZES, seed=SEED, specs={s: SPEC for s in SIZES})
  v = qcfg.demo_vl().vision
  demo_tokenizer.write(os.path.join(out_dir, "tokenizer"), patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                       temporal_patch_size=v.temporal_patch_size, min_pixels=SPEC.pixels, max_pixels=SPEC.pixels)
  with open(os.path.join(out_dir, "pairs.jsonl"), "w") as f:
    for row in _rows(paths["sft"]):
      first = row["completion"].split()[0]
      f.write(json.dumps({"prompt": row["prompt"], "chosen": row["completion"],
                          "rejected": " ".join([first] * LOOP_LEN), "images": row["images"]}) + "\n")


if __name__ == "__main__":
  build()
  total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(OUT) for n in ns)
  print(f"wrote {os.path.normpath(OUT)} ({total} bytes)")
