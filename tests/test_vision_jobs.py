"""sft -> eval -> mine -> dpo -> eval with images, for Qwen2.5-VL and Gemma 3, each step a
`python -m jaxdpo.main --config configs/tiny_vl.py:JOB` run.

Each family starts from a tiny random HF checkpoint (`save_pretrained`, then `hf_to_jax_dir`),
whose tokenizer dir holds a tiny tokenizer with the image tokens, a chat template that writes
image parts, and the family's image-processor config. Records carry 0, 1 or 2 PNGs (paths
relative to the data file). Hand-offs are the documented ones: `DIR/model` (+ its tokenizer)
and `DIR/pairs.jsonl`.
"""

import json
import os
import subprocess
import sys

import pytest

import _vision_job_helpers as VH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN_KEYS = {"where", "prompt", "reference", "hypothesis", "tokens", "num_generated", "hit_limit", "is_degenerate"}


def _main(job, workdir, *args):
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", f"tiny_vl.py:{job}"),
         "--workdir", str(workdir), "--config.train.progress=False", "--config.mesh.data=1", *args]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, f"{job} failed:\n{r.stderr[-4000:]}"
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["job"] == job
  return r


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _model(model_dir):
  return [f"--config.model.checkpoint={model_dir}", f"--config.data.tokenizer={model_dir}/tokenizer"]


def _check_eval(workdir, records):
  rows = _jsonl(workdir / "generations.jsonl")
  assert len(rows) == len(records) and all(GEN_KEYS <= set(r) for r in rows)
  assert all(len(r["tokens"]) == r["num_generated"] <= 12 for r in rows)
  for row, rec in zip(rows, records):
    # Image rows name their (resolved) image files; text-only rows name none.
    want = [os.path.join(os.path.dirname(workdir / "x"), "..", "data", p) for p in rec.get("images", [])]
    assert [os.path.realpath(p) for p in row.get("images", [])] == [os.path.realpath(p) for p in want]
  with open(workdir / "eval_summary.json") as f:
    summary = json.load(f)
  assert summary["n"] == len(records) and 0.0 <= summary["degeneration_rate"] <= 1.0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_vision_sft_eval_mine_dpo_eval(tmp_path, family):
  ck, _ = VH.build_checkpoint(family, str(tmp_path), seed=1)
  sft_data, prompts, _ = VH.vision_records(str(tmp_path / "data"), n=6, seed=2)
  records = _jsonl(prompts)
  assert sorted({len(r.get("images", [])) for r in records}) == [0, 1, 2]
  sft, eval0, mine, dpo, eval1 = (tmp_path / n for n in ("sft", "eval0", "mine", "dpo", "eval1"))

  _main("sft", sft, *_model(ck), f"--config.data.train={sft_data}")
  metrics = _jsonl(sft / "metrics.jsonl")
  assert [m["step"] for m in metrics] == [2, 4] and metrics[-1]["loss"] < metrics[0]["loss"]
  for name in ("jaxdpo_model.json", "params", "tokenizer/preprocessor_config.json", "tokenizer/tokenizer.json"):
    assert (sft / "model" / name).exists(), name

  _main("eval", eval0, *_model(sft / "model"), f"--config.data.prompts={prompts}")
  _check_eval(eval0, records)

  _main("mine", mine, *_model(sft / "model"), f"--config.data.prompts={prompts}")
  pairs = _jsonl(mine / "pairs.jsonl")
  with open(mine / "mine_summary.json") as f:
    summary = json.load(f)
  assert summary["records"] == 6 and summary["samples"] == 12 and summary["pairs"] == len(pairs) >= 2
  assert all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
  # Pairs keep their record's images, as absolute paths (pairs.jsonl lives elsewhere).
  by_source = {os.path.basename(p["source"]): p for p in pairs}
  assert any(p.get("images") for p in pairs)
  for p in pairs:
    assert all(os.path.isabs(i) and os.path.isfile(i) for i in p.get("images", []))
    line = int(p["source"].rsplit(":", 1)[1])
    assert len(p.get("images", [])) == len(records[line - 1].get("images", []))
  del by_source

  _main("dpo", dpo, *_model(sft / "model"), f"--config.data.train={mine / 'pairs.jsonl'}",
        f"--config.data.degeneration_eval={prompts}", "--config.train.degeneration_eval_every=4")
  dpo_metrics = _jsonl(dpo / "metrics.jsonl")
  assert [m["step"] for m in dpo_metrics] == [2, 4]
  last = dpo_metrics[-1]
  assert 0.0 <= last["eval/degeneration_rate"] <= 1.0 and "rewards/margins" in last and last["grad_norm"] > 0
  assert (dpo / "model" / "tokenizer" / "preprocessor_config.json").exists()

  _main("eval", eval1, *_model(dpo / "model"), f"--config.data.prompts={prompts}")
  _check_eval(eval1, records)
