"""sft -> eval -> mine -> dpo -> eval on tiny configs, each step a `python -m jaxdpo.main` run.

The documented hand-offs: a training job writes `DIR/model` (a converted-checkpoint dir with
its tokenizer), which the next job takes as `--config.model.checkpoint` and
`--config.data.tokenizer=DIR/model/tokenizer`; the mine job writes `DIR/pairs.jsonl`, which
the dpo job takes as `--config.data.train`.
"""

import json
import os
import subprocess
import sys

from tests._dpo_helpers import ROOT

GEN_KEYS = {"where", "prompt", "reference", "hypothesis", "tokens", "num_generated", "hit_limit", "is_degenerate",
            "is_early_loop", "loop_period"}
SUMMARY_KEYS = {"n", "degeneration_rate", "degeneration_rate_ci95", "cer", "wer", "generated_tokens",
                "degenerate_time_share", "early_loop"}


def _main(config, workdir, *args):
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", config), "--workdir",
         str(workdir), "--config.train.progress=False", "--config.mesh.data=1", *args]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, f"{config} failed:\n{r.stderr[-4000:]}"
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["job"] == config.split("_")[1].split(".")[0]
  return r


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _model_args(model_dir):
  return [f"--config.model.checkpoint={model_dir}", f"--config.data.tokenizer={model_dir}/tokenizer"]


def _check_eval(workdir, n):
  rows = _jsonl(workdir / "generations.jsonl")
  assert len(rows) == n and all(GEN_KEYS <= set(r) for r in rows)
  assert all(len(r["tokens"]) == r["num_generated"] <= 24 for r in rows)
  with open(workdir / "eval_summary.json") as f:
    summary = json.load(f)
  assert SUMMARY_KEYS <= set(summary) and summary["n"] == n
  lo, hi = summary["degeneration_rate_ci95"]
  assert 0.0 <= lo <= summary["degeneration_rate"] <= hi <= 1.0
  return summary


def test_sft_eval_mine_dpo_eval(tmp_path):
  sft, eval0, mine, dpo, eval1 = (tmp_path / n for n in ("sft", "eval0", "mine", "dpo", "eval1"))
  _main("tiny_sft.py", sft, "--config.train.num_steps=20", "--config.train.batch_size=8")
  sft_metrics = _jsonl(sft / "metrics.jsonl")
  assert sft_metrics[-1]["step"] == 20 and sft_metrics[-1]["loss"] < sft_metrics[0]["loss"]
  for name in ("jaxdpo_model.json", "params", "tokenizer"):
    assert (sft / "model" / name).exists()

  _main("tiny_eval.py", eval0, *_model_args(sft / "model"))
  n_prompts = len(_jsonl(os.path.join(ROOT, "jaxdpo", "assets", "tiny_prompts.jsonl")))
  _check_eval(eval0, n_prompts)

  _main("tiny_mine.py", mine, *_model_args(sft / "model"))
  pairs = _jsonl(mine / "pairs.jsonl")
  with open(mine / "mine_summary.json") as f:
    summary = json.load(f)
  n_mine = len(_jsonl(os.path.join(ROOT, "jaxdpo", "assets", "tiny_mine_prompts.jsonl")))
  assert summary["records"] == n_mine and summary["samples"] == 2 * n_mine
  assert summary["pairs"] == len(pairs) >= 4
  assert summary["pairs"] + sum(summary["records_without_pair"].values()) == n_mine
  assert all({"prompt", "chosen", "rejected", "rejected_hit_limit"} <= set(p) and p["chosen"] != p["rejected"]
             for p in pairs)
  assert summary["pairs_rejected_hit_limit"] == sum(p["rejected_hit_limit"] for p in pairs)
  assert 0 < summary["max_pair_length"] <= 48  # tiny_dpo's data.max_length

  _main("tiny_dpo.py", dpo, *_model_args(sft / "model"), f"--config.data.train={mine / 'pairs.jsonl'}",
        "--config.train.num_steps=4", "--config.train.batch_size=4", "--config.train.log_every=2",
        f"--config.data.degeneration_eval={os.path.join(ROOT, 'jaxdpo', 'assets', 'tiny_prompts.jsonl')}",
        "--config.train.degeneration_eval_every=4", "--config.generate.max_new_tokens=24",
        "--config.generate.max_prompt_length=24")
  dpo_metrics = _jsonl(dpo / "metrics.jsonl")
  assert [m["step"] for m in dpo_metrics] == [2, 4]
  assert 0.0 <= dpo_metrics[-1]["eval/degeneration_rate"] <= 1.0

  _main("tiny_eval.py", eval1, *_model_args(dpo / "model"))
  _check_eval(eval1, n_prompts)
