"""LoRA resume (issue 13, acceptance 5's resume line, tiny Qwen2 text): 4 steps in one process == 2 steps,
exit, the same command continues to 4; the checkpoint holds the adapters and their optimizer state only."""

import os

import jax
import numpy as np

from tests._dpo_helpers import read_metrics, run_main
from tests._multihost_helpers import final_state

N = 4
COMMON = [f"--config.train.num_steps={N}", "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.batch_size=4", "--config.mesh.data=1", "--config.optim.warmup_steps=0",
          "--config.optim.lr=1e-2", "--config.lora.rank=4", "--config.data.eval="]


def test_lora_resume_is_bit_identical(tmp_path):
  full, split = tmp_path / "full", tmp_path / "split"
  r = run_main(full, *COMMON)
  assert r.returncode == 0, r.stderr[-3000:]
  r1 = run_main(split, *COMMON, f"--config.train.stop_at_step={N // 2}")
  assert r1.returncode == 0, r1.stderr[-3000:]
  r2 = run_main(split, *COMMON)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "resumed from" in r2.stderr

  a, b = final_state(full, N), final_state(split, N)
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_array_equal(x, y)
  opt_a = jax.tree.leaves(a["opt_state"])
  for x, y in zip(opt_a, jax.tree.leaves(b["opt_state"]), strict=True):
    np.testing.assert_array_equal(x, y)
  # Adam's moments cover the adapters only: their sizes sum to twice the adapter sizes (+ scalar counts).
  adapters = [x for p, x in jax.tree_util.tree_flatten_with_path(a["params"])[0] if "lora_" in str(p[-1])]
  assert adapters
  big = sum(x.size for x in opt_a if x.size > 1)
  assert big == 2 * sum(x.size for x in adapters)
  ma, mb = read_metrics(full), read_metrics(split)
  assert [m["step"] for m in mb] == list(range(1, N + 1))
  for x, y in zip(ma[N // 2:], mb[N // 2:]):
    assert x == y
  assert ma[-1]["loss"] != ma[N // 2]["loss"]
