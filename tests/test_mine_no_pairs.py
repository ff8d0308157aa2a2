"""`mine` that yields no pair fails at the CLI with a reason, unless the fallback was chosen."""

import os
import subprocess
import sys

from tests._dpo_helpers import ROOT

# A random tiny model; a repeat count no 12-token sample can reach, so no sample degenerates.
_NEVER_DEGENERATE = ["--config.degeneration.min_repeats=100", "--config.generate.max_new_tokens=12",
                     "--config.degeneration.tail_window=12", "--config.mine.num_samples=1",
                     "--config.train.progress=False"]


def _mine(workdir, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "jaxdpo.main", "--config", "configs/tiny_mine.py", "--workdir",
                         str(workdir), *_NEVER_DEGENERATE, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_zero_pairs_without_a_fallback_exits_2_with_the_reason(tmp_path):
  out = _mine(tmp_path / "w", "--config.mine.rejected=degenerate")
  assert out.returncode == 2, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert "0 pairs" in errors[0] and "no_degenerate_sample" in errors[0] and "mine.rejected=worst_cer" in errors[0]
  assert not (tmp_path / "w" / "pairs.jsonl").exists()
  assert (tmp_path / "w" / "samples.jsonl").exists()  # kept, to see what the model wrote


def test_the_explicit_fallback_yields_pairs(tmp_path):
  out = _mine(tmp_path / "w", "--config.mine.rejected=worst_cer")
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "w" / "pairs.jsonl").read_text().strip()
