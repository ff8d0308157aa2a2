"""Ctrl-C and SIGTERM stop at a step boundary with a checkpoint; resuming under a changed config is refused."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdpo.train import loop
from tests._dpo_helpers import ROOT, read_metrics, run_main

N = 16
COMMON = [f"--config.train.num_steps={N}", "--config.train.log_every=1", "--config.train.ckpt_every=1000",
          "--config.train.batch_size=4", "--config.mesh.data=1", "--config.optim.warmup_steps=2"]


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))["params"]


def _steps_saved(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_sigint_after_a_logged_step_checkpoints_and_resume_matches(tmp_path):
  full, split = tmp_path / "full", tmp_path / "split"
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", "tiny_dpo.py"),
         "--workdir", str(split), "--config.train.progress=False", *COMMON]
  proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:  # the first logged step, then Ctrl-C (as a terminal would send it)
    lines.append(line)
    if "INFO step 3:" in line:
      proc.send_signal(signal.SIGINT)
      break
  out, rest = proc.communicate(timeout=600)
  err = "".join(lines) + rest
  assert proc.returncode == 0, err[-3000:]
  assert "KeyboardInterrupt" not in err and "Traceback" not in err
  saved = _steps_saved(split)
  assert len(saved) == 1 and 3 <= saved[0] < N, (saved, err[-2000:])
  stop_lines = [l for l in err.splitlines() if l.startswith("stopped by SIGINT")]
  assert stop_lines == [f"stopped by SIGINT after step {saved[0]}: checkpoint saved to "
                        f"{split / 'checkpoints' / str(saved[0])}; re-run the same command to resume"]
  assert not (split / "model").exists()  # not finished: no final model yet

  r = run_main(split, *COMMON)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from {split / 'checkpoints'} at step {saved[0]}" in r.stderr
  assert f"finished at step {N}: checkpoint saved to {split / 'checkpoints' / str(N)}" in r.stderr
  r = run_main(full, *COMMON)
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = jax.tree.leaves(_params(full, N)), jax.tree.leaves(_params(split, N))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert [m["step"] for m in read_metrics(split)] == list(range(1, N + 1))
  assert read_metrics(split)[-1] == read_metrics(full)[-1]


def test_second_ctrl_c_aborts_at_once():
  # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
  # Python then installs no handler of its own: set Python's default here so that the test checks
  # the guard's own restore, whatever the runner inherited.
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with loop.PreemptionGuard() as guard:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
      assert guard.requested and guard.signal_name == "SIGINT"
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit
  finally:
    signal.signal(signal.SIGINT, inherited)


def test_sigterm_is_one_line_too():
  with loop.PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert guard.requested and guard.signal_name == "SIGTERM"


SHORT = ["--config.train.num_steps=2", "--config.train.log_every=1", "--config.train.batch_size=4",
         "--config.mesh.data=1"]


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path):
  work = tmp_path / "w"
  r = run_main(work, *SHORT, "--config.train.stop_at_step=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "stopped at config.train.stop_at_step=1" in r.stderr
  config_before = (work / "config.json").read_text()

  r = run_main(work, *SHORT, "--config.optim.lr=0.01", "--config.train.batch_size=8")
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith(f"error: {work} holds a checkpoint of a run with another config")
  assert "optim.lr: 0.003 -> 0.01" in err and "train.batch_size: 4 -> 8" in err
  assert "cannot change on resume" in err
  assert (work / "config.json").read_text() == config_before  # not overwritten
  assert _steps_saved(work) == [1]

  r = run_main(work, *SHORT[1:], "--config.train.num_steps=3")
  assert r.returncode == 2
  assert "train.num_steps: 2 -> 3" in r.stderr and "--config.train.allow_changed=train.num_steps" in r.stderr

  r = run_main(work, *SHORT[1:], "--config.train.num_steps=3", "--config.train.allow_changed=optim.lr")
  assert r.returncode == 2 and "allow_changed names optim.lr, which cannot change on resume" in r.stderr

  # The documented override; stop_at_step (run control) may always differ.
  r = run_main(work, *SHORT[1:], "--config.train.num_steps=3", "--config.train.allow_changed=train.num_steps")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr and _steps_saved(work)[-1] == 3
  assert [m["step"] for m in read_metrics(work)] == [1, 2, 3]
