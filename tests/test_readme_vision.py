"""The README's `configs/tiny_vl.py` block, run as written (bash, one device, no hub) from a
directory that is not the repository root: the shipped vision assets make every job runnable."""

import json
import os
import re
import subprocess
import sys

from tests import _xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(marker: str) -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  found = [b for b in blocks if marker in b]
  assert len(found) == 1, f"README.md: expected one bash block with {marker!r}, found {len(found)}"
  return found[0]


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_readme_tiny_vl_chain_runs_from_another_directory(tmp_path):
  block = _readme_block("configs/tiny_vl.py:sft")
  assert block.count("python -m jaxdpo.main") == 4 and "/tmp/vl/" in block
  script = block.replace("/tmp/vl/", f"{tmp_path}/vl/")  # the only change: where runs go
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  # This checkout first on the path, as an installed jaxdpo would be; a user's environment
  # (one device, not the suite's 8 fake ones).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = _xla_flags.FAST_COMPILE
  env.update(PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  vl = tmp_path / "vl"
  assert [m["step"] for m in _jsonl(vl / "sft" / "metrics.jsonl")] == [2, 4]
  assert (vl / "sft" / "model" / "tokenizer" / "preprocessor_config.json").exists()
  gens = _jsonl(vl / "eval" / "generations.jsonl")
  assert len(gens) == 4 and all(len(g["images"]) == 1 and os.path.isfile(g["images"][0]) for g in gens)
  pairs = _jsonl(vl / "mine" / "pairs.jsonl")
  assert len(pairs) >= 1 and all(os.path.isabs(p["images"][0]) and os.path.isfile(p["images"][0]) for p in pairs)
  with open(vl / "dpo" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["data"]["train"] == str(vl / "mine" / "pairs.jsonl") and cfg["model"]["checkpoint"] == str(
      vl / "sft" / "model")
  assert [m["step"] for m in _jsonl(vl / "dpo" / "metrics.jsonl")] == [2, 4]
  assert "dpo finished at step 4/4" in r.stdout
  # The chain's model (a preset, trained) exports, as the block's last line writes it, and loads.
  assert r.stdout.count("export   python -m jaxdpo.convert jax-to-hf --ckpt") == 2  # sft's and dpo's summaries
  import torch
  from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
  hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(vl / "hf"), dtype=torch.float32,
                                                                 output_loading_info=True)
  assert {k: v for k, v in info.items() if v} == {}, info
  assert hf.config.text_config.vocab_size == 64 and AutoTokenizer.from_pretrained(str(vl / "hf")).eos_token


def test_tiny_vl_defaults_are_shipped_files():
  from jaxdpo.configs import tiny_vl
  for job in tiny_vl.JOBS:
    c = tiny_vl.get_config(job)
    data = c.data.train or c.data.prompts
    assert os.path.isfile(data) and os.path.isfile(os.path.join(c.data.tokenizer, "preprocessor_config.json"))
    for row in _jsonl(data):  # relative to the records file, never to the working directory
      assert all(not os.path.isabs(p) and os.path.isfile(os.path.join(os.path.dirname(data), p))
                 for p in row["images"])
