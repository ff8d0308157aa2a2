"""A NaN step stops the run (or is skipped) and is never checkpointed; damaged checkpoints and a
cut-off metrics line on resume are handled with a clear message."""

import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests._dpo_helpers import read_metrics, run_main

COMMON = ["--config.train.num_steps=6", "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.batch_size=4", "--config.mesh.data=1", "--config.optim.warmup_steps=1"]


def _saved(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state")))["params"]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  work = tmp_path / "w"
  r = run_main(work, *COMMON, "--config.train.debug_nonfinite_step=3")
  assert r.returncode == 2, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: step 3: non-finite loss=nan, grad_norm=nan; training stopped and this step was "
                         f"not saved (the latest checkpoint is step 2 in {work / 'checkpoints'})"), last
  assert _saved(work) == [2]  # nothing from step 3 on
  assert not (work / "model").exists()
  assert all(math.isfinite(x) for x in np.concatenate([np.ravel(v) for v in jax.tree.leaves(_params(work, 2))]))


def test_on_nonfinite_skip_finishes_and_counts_the_skipped_step(tmp_path):
  work = tmp_path / "w"
  r = run_main(work, *COMMON, "--config.train.debug_nonfinite_step=3", "--config.train.on_nonfinite=skip")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 3: non-finite loss=nan, grad_norm=nan; update skipped (1 so far" in r.stderr
  rows = read_metrics(work)
  assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
  assert [m["nonfinite_skipped"] for m in rows] == [0, 0, 1, 1, 1, 1]
  assert _saved(work)[-1] == 6
  leaves = jax.tree.leaves(_params(work, 6))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def _damage(step_dir):
  """Truncates every file of a saved step (as a full disk or a kill mid-copy would leave it)."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)


def test_corrupt_latest_checkpoint_falls_back_and_truncated_metrics_line_is_dropped(tmp_path):
  work = tmp_path / "w"
  r = run_main(work, *COMMON, "--config.train.stop_at_step=4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _saved(work) == [2, 4]
  _damage(work / "checkpoints" / "4")
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "loss": 0.6')  # a kill during the write of the next line
  r = run_main(work, *COMMON)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"checkpoint step 4 in {work / 'checkpoints'} cannot be restored" in r.stderr
  assert "falling back to step 2" in r.stderr
  assert f"resumed from {work / 'checkpoints'} at step 2" in r.stderr
  assert "dropping a truncated last line" in r.stderr
  assert [m["step"] for m in read_metrics(work)] == [1, 2, 3, 4, 5, 6]
  assert (work / "checkpoints" / "4.corrupt").is_dir() and _saved(work)[-1] == 6


def test_every_checkpoint_corrupt_is_refused(tmp_path):
  work = tmp_path / "w"
  r = run_main(work, *COMMON, "--config.train.stop_at_step=2")
  assert r.returncode == 0, r.stderr[-3000:]
  _damage(work / "checkpoints" / "2")
  r = run_main(work, *COMMON)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: {work / 'checkpoints'}: no checkpoint could be "
                                                      "restored (step 2:")
  assert not (work / "model").exists()
