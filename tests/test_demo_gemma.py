"""The demo's Gemma 3 variant (configs/demo_degeneration.py:gemma3_ci), end to end: square pages at
SigLIP's size with one pooled image token per glyph cell, the Gemma tokenizer with contiguous ids,
all six stages, and the report recomputed from the eval stages' outputs. The plumbing only: a
12-step SFT model's rates mean nothing (BUILD_NOTES, issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from jaxdpo.demo import script
from jaxdpo.demo import tokenizer as demo_tokenizer
from jaxdpo.models import registry
from tests._dpo_helpers import ROOT


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_gemma3_variant_runs_every_stage_on_square_pages(tmp_path):
  run = tmp_path / "run"
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", "configs/demo_degeneration.py:gemma3_ci", "--workdir",
         str(run), "--config.train.progress=False", "--config.mesh.data=1", "--config.demo.sft_steps=4",
         "--config.demo.dpo_steps=2"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-4000:]
  cfg = registry.get_family("gemma3").presets["demo_gemma"]()
  side = cfg.vision.image_size
  assert side == script.CELL * int(round(cfg.mm_tokens_per_image ** 0.5))
  # Every page of every split is the square the processor keeps as it is.
  for split in ("sft", "mine", "heldout"):
    recs = _jsonl(run / "data" / f"{split}.jsonl")
    for rec in recs[:5]:
      with Image.open(run / "data" / rec["images"][0]) as im:
        assert im.size == (side, side)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(run / "data" / "tokenizer")
  assert len(tok) == cfg.text.vocab_size == demo_tokenizer.GEMMA_VOCAB_SIZE
  assert tok.convert_tokens_to_ids("<image_soft_token>") == cfg.image_token_id
  # Each stage's outputs exist; the report's SFT rate is the held-out generations' own.
  for i, name in enumerate(("sft", "eval_sft", "mine", "dpo", "control", "eval_after"), 1):
    assert (run / f"{i}_{name}" / "stage_done.json").exists(), name
  rows = _jsonl(run / "2_eval_sft" / "generations.jsonl")
  report = json.loads((run / "report.json").read_text())
  sft = report["models"]["sft"]
  assert sft["n"] == len(rows)
  assert np.isclose(sft["degeneration_rate"], np.mean([bool(x["is_degenerate"]) for x in rows]))
  with open(os.path.join(run, "1_sft", "model", "jaxdpo_model.json")) as f:
    meta = json.load(f)
  assert "gemma3" in json.dumps(meta)
