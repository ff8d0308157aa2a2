"""Resuming: N steps in one process == N/2 steps, process exits, same command continues to N."""

import os

import jax
import numpy as np

from tests._dpo_helpers import read_metrics, run_main
from tests._multihost_helpers import final_state

N = 8
COMMON = [f"--config.train.num_steps={N}", "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.batch_size=4", "--config.mesh.data=1", "--config.optim.warmup_steps=2"]


def test_resume_gives_identical_parameters_and_metrics(tmp_path):
  full, split = tmp_path / "full", tmp_path / "split"
  r = run_main(full, *COMMON)
  assert r.returncode == 0, r.stderr[-3000:]
  r1 = run_main(split, *COMMON, f"--config.train.stop_at_step={N // 2}")
  assert r1.returncode == 0, r1.stderr[-3000:]
  assert sorted(int(s) for s in os.listdir(split / "checkpoints") if s.isdigit())[-1] == N // 2
  assert [m["step"] for m in read_metrics(split)] == list(range(1, N // 2 + 1))
  r2 = run_main(split, *COMMON)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "resumed from" in r2.stderr

  a, b = final_state(full, N), final_state(split, N)
  assert int(a["step"]) == int(b["step"]) == N
  leaves_a, leaves_b = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(a["opt_state"]), jax.tree.leaves(b["opt_state"])):
    np.testing.assert_array_equal(x, y)

  ma, mb = read_metrics(full), read_metrics(split)
  assert [m["step"] for m in mb] == list(range(1, N + 1))  # no duplicated or missing steps
  for x, y in zip(ma[N // 2:], mb[N // 2:]):
    assert x == y
  # Training did something between the halves (otherwise equality would be vacuous).
  assert ma[-1]["loss"] != ma[N // 2]["loss"]
