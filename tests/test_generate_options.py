"""`generate.refill`, `generate.stop_on_loop` and `generate.stop_on_loop_check` through the eval job."""

from __future__ import annotations

import importlib.util
import json
import os

from tests._dpo_helpers import ROOT
from jaxdpo.jobs import evaluate


def _config(**generate):
  spec = importlib.util.spec_from_file_location("tiny_eval", os.path.join(ROOT, "configs", "tiny_eval.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.unlock()
  c.train.progress = False
  c.mesh.data = 1
  c.generate.batch_size = 3  # fewer rows than prompts: refill and static batching differ in schedule
  c.degeneration.max_period = 8
  c.degeneration.tail_window = 8
  for k, v in generate.items():
    c.generate[k] = v
  return c


def _rows(path):
  with open(os.path.join(path, "generations.jsonl")) as f:
    return [json.loads(x) for x in f]


def test_refill_and_early_stop_in_the_eval_job(tmp_path):
  runs = {}
  for name, opts in {"static": dict(refill=False), "refill": dict(refill=True),
                     "stop": dict(stop_on_loop=True, stop_on_loop_check=True), "stop_only": dict(stop_on_loop=True)}.items():
    os.makedirs(tmp_path / name)
    evaluate.run(_config(**opts), str(tmp_path / name))
    runs[name] = (_rows(tmp_path / name), json.load(open(tmp_path / name / "eval_summary.json")))
  static, refill = runs["static"][0], runs["refill"][0]
  assert [r["tokens"] for r in static] == [r["tokens"] for r in refill]
  assert "batch_id" in static[0] and "wall_time_s" in refill[0]  # static timing vs per-record slot time
  assert "early_stop" not in runs["refill"][1]
  # Early stop: cut rows are prefixes of the full-length rows and carry both verdicts.
  stop, summary = runs["stop"]
  assert any(r["degenerate_early"] for r in stop), "the tiny random model never loops; pick another config"
  for full, early in zip(refill, stop):
    if early["degenerate_early"]:
      assert full["tokens"][:early["num_generated"]] == early["tokens"] and early["is_degenerate"]
      assert early["num_generated"] < full["num_generated"] and not early["hit_limit"]
    else:
      assert early["tokens"] == full["tokens"]
    assert early["degenerate_full"] == full["is_degenerate"]
  es = summary["early_stop"]
  assert es["measured"] and sum(es["confusion"].values()) == es["n"] == len(stop)
  assert es["agreement"] == sum(r["is_degenerate"] == r["degenerate_full"] for r in stop) / len(stop)
  assert runs["stop_only"][1]["early_stop"]["measured"] is False
  assert all("degenerate_full" not in r for r in runs["stop_only"][0])
