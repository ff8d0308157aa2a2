"""Evaluates a demo run's SFT model (greedy) on freshly drawn pages of any PageSpec: a loop screen.

  python scripts/demo_stress_eval.py RUN_DIR NAME '{"cols": 6, "rows": 8, "min_lines": 8, "max_lines": 8,
      "repeat_times": [8, 8], "blocks": ["repeat", "alternate"]}' [--max-new-tokens 120] [--pages 200]

Writes RUN_DIR/stress/NAME/{pages/, heldout.jsonl, tokenizer/, eval/} and prints the report's metrics
(loops with their Wilson interval, hit-limit, CER, exact, S / D / I, ended early). No page reuses a
line of RUN_DIR/data/sft.jsonl. The tokenizer is rewritten with image-processor bounds that cover the
new canvas, so a taller page is not resized (each glyph stays one merged vision token).
Used for the issue 15 stress screens (BUILD_NOTES, "The study reproduced").
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main():
  p = argparse.ArgumentParser()
  p.add_argument("run_dir")
  p.add_argument("name")
  p.add_argument("spec", help="PageSpec fields as JSON")
  p.add_argument("--max-new-tokens", type=int, default=120)
  p.add_argument("--pages", type=int, default=200)
  args = p.parse_args()
  from jaxdpo.configs import demo_degeneration
  from jaxdpo.demo import pages, report
  from jaxdpo.demo import tokenizer as demo_tokenizer
  from jaxdpo.jobs import demo, evaluate

  spec = pages.PageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.spec).items()})
  out = os.path.join(args.run_dir, "stress", args.name)
  os.makedirs(os.path.join(out, "pages"), exist_ok=True)
  with open(os.path.join(args.run_dir, "data", "sft.jsonl")) as f:
    sft_lines = {line.strip() for row in map(json.loads, f) for line in row["completion"].split("|")}
  rng, rows, texts = np.random.RandomState([7, len(args.name)]), [], set()
  while len(rows) < args.pages:
    lines = pages.make_page(rng, spec)
    text = pages.transcription(lines)
    if text in texts or any(" ".join(line) in sft_lines for line in lines):
      continue  # the model never trained on any line of a stress page
    texts.add(text)
    name = f"pages/s_{len(rows)}.png"
    pages.render(lines, spec, np.random.RandomState([7, len(rows), 1])).save(os.path.join(out, name))
    rows.append({"prompt": pages.PROMPT, "reference": text, "images": [name]})
  with open(os.path.join(out, "heldout.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  config = demo_degeneration.get_config()
  model = os.path.join(args.run_dir, "1_sft", "model")
  with open(os.path.join(model, "tokenizer", "preprocessor_config.json")) as f:
    size = json.load(f)["size"]
  tok = demo_tokenizer.write(os.path.join(out, "tokenizer"), patch_size=4, merge_size=2, temporal_patch_size=2,
                             min_pixels=min(spec.pixels, size["shortest_edge"]),
                             max_pixels=max(spec.pixels, size["longest_edge"]))
  sub = demo._sub_config(config, "eval", **{
      "data.prompts": os.path.join(out, "heldout.jsonl"), "model.checkpoint": model, "data.tokenizer": tok,
      "generate.max_new_tokens": args.max_new_tokens, "generate.max_prompt_length": 16 + spec.pixels // pages.script.CELL ** 2,
      "train.progress": False})
  evaluate.run(sub, os.path.join(out, "eval"))
  m = report.metrics(report.read_jsonl(os.path.join(out, "eval", "generations.jsonl")))
  print(json.dumps({k: m[k] for k in ("n", "loops", "degeneration_rate_ci95", "hit_limit", "cer", "exact",
                                      "substitutions", "deletions", "insertions", "ended_early")}))


if __name__ == "__main__":
  main()
