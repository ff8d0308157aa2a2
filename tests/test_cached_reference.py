"""`dpo.reference=cached` (log-probs precomputed once) trains exactly like a live frozen reference."""

import pytest

from jaxdpo.cli import main as jmain
from tests._dpo_helpers import demo_config, read_metrics


def _run(workdir, reference):
  config = demo_config(**{"dpo.reference": reference, "train.num_steps": 3, "train.log_every": 1,
                          "train.batch_size": 4, "mesh.data": 1, "optim.warmup_steps": 0})
  jmain.run(config, str(workdir))
  return read_metrics(workdir)


def test_cached_reference_matches_live_reference(tmp_path):
  live, cached = _run(tmp_path / "live", "model"), _run(tmp_path / "cached", "cached")
  assert [m["step"] for m in live] == [m["step"] for m in cached] == [1, 2, 3]
  for a, b in zip(live, cached):
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert live[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
