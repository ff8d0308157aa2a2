"""The demo job (configs/demo_degeneration.py:ci), end to end: the six stages feed each other,
the splits are disjoint, no rejected loop ends in EOS, the report is recomputed from the eval
stages' generations.jsonl, a re-run resumes, and a mining stage without loops stops and says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jiwer
import pytest

from tests._dpo_helpers import ROOT


def _main(workdir, *args):
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", "configs/demo_degeneration.py:ci", "--workdir",
         str(workdir), "--config.train.progress=False", "--config.mesh.data=1", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("demo") / "run"
  r = _main(d)
  assert r.returncode == 0, r.stderr[-4000:]
  for i in range(1, 7):
    assert f"[stage {i}/6]" in r.stdout
  return d


def test_stages_feed_each_other(run_dir):
  sft_model, dpo_model, control_model = (str(run_dir / s / "model") for s in ("1_sft", "4_dpo", "5_control"))
  data = run_dir / "data"
  sft_cfg = _json(run_dir / "1_sft" / "config.json")
  assert sft_cfg["job"] == "sft" and sft_cfg["data"]["train"] == str(data / "sft.jsonl")
  assert sft_cfg["model"]["preset"] == "demo_vl" and not sft_cfg["model"]["checkpoint"]
  ev = _json(run_dir / "2_eval_sft" / "config.json")
  assert ev["model"]["checkpoint"] == sft_model and ev["data"]["prompts"] == str(data / "heldout.jsonl")
  mine_cfg = _json(run_dir / "3_mine" / "config.json")
  assert mine_cfg["model"]["checkpoint"] == sft_model and mine_cfg["data"]["prompts"] == str(data / "mine.jsonl")
  assert mine_cfg["mine"]["rejected"] == "degenerate" and mine_cfg["mine"]["chosen"] == "reference"
  dpo_cfg = _json(run_dir / "4_dpo" / "config.json")
  pairs = _jsonl(run_dir / "3_mine" / "pairs.jsonl")
  assert dpo_cfg["model"]["checkpoint"] == sft_model and dpo_cfg["data"]["train"] == str(run_dir / "3_mine" /
                                                                                         "pairs.jsonl")
  assert dpo_cfg["dpo"]["reference"] == "model" and dpo_cfg["dpo"]["rpo_alpha"] > 0
  assert dpo_cfg["data"]["max_length"] >= _json(run_dir / "3_mine" / "mine_summary.json")["max_pair_length"] > 0
  # The control trains on exactly the mined pages, with their transcriptions, DPO's steps and lr.
  control_cfg = _json(run_dir / "5_control" / "config.json")
  control = _jsonl(run_dir / "5_control" / "control.jsonl")
  assert control_cfg["job"] == "sft" and control_cfg["model"]["checkpoint"] == sft_model
  assert [(c["images"], c["completion"]) for c in control] == [(p["images"], p["chosen"]) for p in pairs]
  for key in ("num_steps", "batch_size"):
    assert control_cfg["train"][key] == dpo_cfg["train"][key]
  assert control_cfg["optim"]["lr"] == dpo_cfg["optim"]["lr"]
  references = {os.path.abspath(os.path.join(data, r["images"][0])): r["reference"]
                for r in _jsonl(data / "mine.jsonl")}
  assert all(references[p["images"][0]] == p["chosen"] for p in pairs)
  for which, model in (("dpo", dpo_model), ("control", control_model)):
    cfg = _json(run_dir / "6_eval_after" / which / "config.json")
    assert cfg["model"]["checkpoint"] == model and cfg["data"]["prompts"] == str(data / "heldout.jsonl")
  held = [r["reference"] for r in _jsonl(data / "heldout.jsonl")]
  for gen in ("2_eval_sft", "6_eval_after/dpo", "6_eval_after/control"):
    assert [r["reference"] for r in _jsonl(run_dir / gen / "generations.jsonl")] == held


def _lines(rows, field):
  return [line.strip() for r in rows for line in r[field].split("|")]


def test_splits_are_disjoint_and_harder_after_sft(run_dir):
  data = run_dir / "data"
  sft, mine, held = _jsonl(data / "sft.jsonl"), _jsonl(data / "mine.jsonl"), _jsonl(data / "heldout.jsonl")
  texts = [{r[f] for r in rows} for rows, f in ((sft, "completion"), (mine, "reference"), (held, "reference"))]
  lines = [set(_lines(rows, f)) for rows, f in ((sft, "completion"), (mine, "reference"), (held, "reference"))]
  images = [{r["images"][0] for r in rows} for rows in (sft, mine, held)]
  for a in range(3):
    for b in range(a + 1, 3):
      assert not texts[a] & texts[b] and not lines[a] & lines[b] and not images[a] & images[b]

  def longest_run(rows, f):
    best = 0
    for line in _lines(rows, f):
      words, run = line.split(), 0
      for i, w in enumerate(words):
        run = run + 1 if i and w == words[i - 1] else 1
        best = max(best, run)
    return best
  assert longest_run(mine, "reference") > longest_run(sft, "completion")
  assert longest_run(held, "reference") > longest_run(sft, "completion")
  # Every page has its split's canvas, and the image processor keeps every canvas unresized.
  from PIL import Image
  from jaxdpo.demo import pages
  proc = _json(data / "tokenizer" / "preprocessor_config.json")["size"]
  for split, rows in (("sft", sft), ("mine", mine), ("heldout", held)):
    spec = pages.SPLITS[split]
    assert {Image.open(data / r["images"][0]).size for r in rows} == {(spec.cols * 8, spec.rows * 8)}
    assert proc["shortest_edge"] <= spec.pixels <= proc["longest_edge"]


def test_no_rejected_loop_ends_in_eos(run_dir):
  from jaxdpo.data import records, tokenize
  pairs = _jsonl(run_dir / "3_mine" / "pairs.jsonl")
  samples = _jsonl(run_dir / "3_mine" / "samples.jsonl")
  assert pairs and all(p["rejected_is_degenerate"] and p["rejected_hit_limit"] for p in pairs)
  tok = tokenize.load_tokenizer(str(run_dir / "1_sft" / "model" / "tokenizer"))
  assert all(tok.eos_token_id not in s["tokens"] for s in samples if s["hit_limit"])
  from jaxdpo.data.vision import adapters
  from jaxdpo.models import registry
  from jaxdpo.models.qwen2_5_vl import config as qcfg
  cfg = _json(run_dir / "4_dpo" / "config.json")
  vision = adapters.adapter_for(registry.get_family("qwen2_5_vl"), qcfg.demo_vl(), tok,
                                str(run_dir / "1_sft" / "model" / "tokenizer"))
  for i, p in enumerate(pairs):
    rec = records.validate_preference(f"pairs.jsonl:{i + 1}", p)
    seq = tokenize.tokenize_preference(tok, rec, max_length=cfg["data"]["max_length"], truncation="off",
                                       images=adapters.record_images(vision, rec, ""))
    assert seq.rejected and seq.rejected[-1] != tok.eos_token_id and tok.eos_token_id not in seq.rejected
    assert tok.eos_token_id in seq.chosen


def _wilson(k, n, z=1.96):
  p = k / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
  return max(0.0, center - half), min(1.0, center + half)


def test_report_is_recomputed_from_generations(run_dir):
  rep = _json(run_dir / "report.json")
  md = (run_dir / "report.md").read_text()
  assert (run_dir / "report.png").stat().st_size > 10_000
  gens = {"sft": "2_eval_sft", "dpo": "6_eval_after/dpo", "control": "6_eval_after/control"}
  for model, where in gens.items():
    rows = _jsonl(run_dir / where / "generations.jsonl")
    got = rep["models"][model]
    n, loops = len(rows), sum(r["is_degenerate"] for r in rows)
    assert (got["n"], got["loops"]) == (n, loops) and got["degeneration_rate"] == pytest.approx(loops / n)
    assert got["degeneration_rate_ci95"] == pytest.approx(list(_wilson(loops, n)), rel=1e-9)
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    edits = [jiwer.process_words(a, b) for a, b in zip(refs, hyps)]
    assert got["substitutions"] == sum(e.substitutions for e in edits)
    assert got["deletions"] == sum(e.deletions for e in edits)
    assert got["insertions"] == sum(e.insertions for e in edits)
    assert got["wer"] == pytest.approx(sum(e.substitutions + e.deletions + e.insertions for e in edits)
                                       / sum(len(a.split()) for a in refs))
    chars = [jiwer.process_characters(a, b) for a, b in zip(refs, hyps)]
    assert got["cer"] == pytest.approx(sum(c.substitutions + c.deletions + c.insertions for c in chars)
                                       / sum(c.substitutions + c.deletions + c.hits for c in chars))
    assert got["exact"] == sum(a.split() == b.split() for a, b in zip(refs, hyps))
    assert got["mean_output_words"] == pytest.approx(sum(len(b.split()) for b in hyps) / n)
    assert got["ended_early"] == sum(1 for r in rows if not r["hit_limit"]
                                     and len(r["hypothesis"].split()) < len(r["reference"].split()))
    assert f"| {model} | {loops}/{n} |" in md
  pairs = _jsonl(run_dir / "3_mine" / "pairs.jsonl")
  assert rep["pairs"]["count"] == len(pairs) and f"Pairs mined: {len(pairs)}" in md
  assert set(rep["stage_seconds"]) >= {"sft", "eval_sft", "mine", "dpo", "control", "eval_after"}
  assert rep["seeds"]["seed"] == 0


def test_rerun_resumes_and_a_mine_without_loops_stops(run_dir, tmp_path):
  r = _main(run_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert all(f"[stage {i}/6]" in r.stdout and "done earlier" in r.stdout for i in range(1, 7))
  # Stages 1-2 copied, mining by sampling at a high temperature: a barely trained model's samples
  # are noise, not loops, and the job must stop and say so instead of training on nothing.
  other = tmp_path / "noloops"
  other.mkdir()
  for name in ("data", "1_sft", "2_eval_sft"):
    shutil.copytree(run_dir / name, other / name, symlinks=True)
  r = _main(other, "--config.mine.temperature=1.0", "--config.mine.top_k=0")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "stage 3/6 (mine)" in r.stderr and "no degenerate sample" in r.stderr
  assert not (other / "4_dpo").exists()
