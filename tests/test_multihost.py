"""Multi-host: two CPU processes joined by jax.distributed train exactly like one process.

Each run is real: `python -m jaxdpo.main` subprocesses on localhost, a coordinator on a free
port, 4 fake CPU devices per process (mesh data=2 x fsdp=4 over both), gloo collectives.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdpo.parallel import distributed
from jaxdpo.parallel import sharding as shd
from jaxdpo.data import pipeline
from tests import _multihost_helpers as mh
from tests._dpo_helpers import read_metrics

N = 4
COMMON = [f"--config.train.num_steps={N}", "--config.train.log_every=1", "--config.train.ckpt_every=10",
          "--config.train.batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=1",
          "--config.optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one = mh.Run(root / "one", 1, 8, *COMMON)     # the reference: one process, 8 devices
  two = mh.Run(root / "two", 2, 4, *COMMON)     # two processes, 4 devices each, at the same time
  out = {"one": one.wait(), "two": two.wait()}
  # The same two-process run, with process 1 sent SIGTERM after step 2; then the same command again.
  out["interrupted"] = mh.run_processes(root / "split", 2, 4, *COMMON, "--config.train.debug_sigterm_step=2")
  out["ckpts_after_interrupt"] = sorted(int(s) for s in os.listdir(root / "split" / "checkpoints") if s.isdigit())
  out["metrics_after_interrupt"] = [m["step"] for m in read_metrics(root / "split")]
  out["resumed"] = mh.run_processes(root / "split", 2, 4, *COMMON)
  out["dirs"] = {k: root / k for k in ("one", "two", "split")}
  return out


def _max_param_diff(a, b):
  la, lb = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
  assert len(la) == len(lb) > 0
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(la, lb))


def test_two_processes_equal_one(runs):
  mh.assert_ok(runs["one"])
  mh.assert_ok(runs["two"])
  err0, err1 = runs["two"][0][2], runs["two"][1][2]
  assert "joined the JAX runtime as process 0 of 2" in err0
  assert "step 1:" in err0 and "step 1:" not in err1  # progress is logged by process 0 only
  one, two = read_metrics(runs["dirs"]["one"]), read_metrics(runs["dirs"]["two"])
  assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, N + 1))  # one writer
  for a, b in zip(one, two):
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
      assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
  assert one[-1]["loss"] < one[0]["loss"] - 1e-3  # training moved: equality is not vacuous
  diff = _max_param_diff(mh.final_state(runs["dirs"]["one"], N), mh.final_state(runs["dirs"]["two"], N))
  assert diff <= 1e-5, diff
  assert os.path.exists(runs["dirs"]["two"] / "config.json")


def test_sigterm_on_one_host_stops_both_and_resume_matches(runs):
  interrupted = runs["interrupted"]
  mh.assert_ok(interrupted)  # both processes exit 0 after the checkpoint
  err0, err1 = interrupted[0][2], interrupted[1][2]
  assert "SIGTERM received" in err1 and "received" not in err0  # only process 1 got it...
  assert "stopped by a signal on another host after step 2: checkpoint saved to" in err0  # ...yet process 0
  assert "stopped by SIGTERM after step 2: checkpoint saved to" in err1                   # stopped at the same step
  assert runs["ckpts_after_interrupt"] == [2]
  assert runs["metrics_after_interrupt"] == [1, 2]

  mh.assert_ok(runs["resumed"])
  assert "resumed from" in runs["resumed"][0][2]
  assert [m["step"] for m in read_metrics(runs["dirs"]["split"])] == list(range(1, N + 1))
  assert _max_param_diff(mh.final_state(runs["dirs"]["two"], N), mh.final_state(runs["dirs"]["split"], N)) <= 1e-6


# ---- the pieces, without subprocesses ---------------------------------------------------------

def test_host_rows_rebuild_the_one_host_batch():
  """Rows split between two hosts, concatenated, equal the one-host batch at every step."""
  examples = [{"i": i} for i in range(21)]
  collate = lambda b: {"i": np.asarray([e["i"] for e in b])}
  whole = pipeline.make_iterator(examples, batch_size=8, collate=collate, seed=3, host_rows=list(range(8)))
  h0 = pipeline.make_iterator(examples, batch_size=8, collate=collate, seed=3, host_rows=[0, 1, 2, 3])
  h1 = pipeline.make_iterator(examples, batch_size=8, collate=collate, seed=3, host_rows=[4, 5, 6, 7])
  for _ in range(6):  # more than two epochs of 21 examples
    b, b0, b1 = next(whole)["i"], next(h0)["i"], next(h1)["i"]
    np.testing.assert_array_equal(np.concatenate([b0, b1]), b)
  assert h0.get_state() == h1.get_state() == whole.get_state()  # one saved state restores every host
  # The old per-host split (i::process_count, shuffled per host) does not have this property.
  old0 = pipeline.make_iterator(examples, batch_size=4, collate=collate, seed=3, process_index=0, process_count=2)
  old1 = pipeline.make_iterator(examples, batch_size=4, collate=collate, seed=3, process_index=1, process_count=2)
  whole = pipeline.make_iterator(examples, batch_size=8, collate=collate, seed=3, host_rows=list(range(8)))
  assert not np.array_equal(np.concatenate([next(old0)["i"], next(old1)["i"]]), next(whole)["i"])


def test_host_rows_single_process_is_every_row():
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert distributed.host_rows(mesh, 16) == list(range(16))
  with pytest.raises(ValueError, match="do not select rows"):
    pipeline.make_iterator([1] * 8, batch_size=8, collate=list, seed=0, host_rows=[8])


def test_detect_explicit_flags_and_errors():
  env = {}
  plan = distributed.detect(env, coordinator="10.0.0.2:1234", num_processes=4, process_id=3,
                            local_device_ids=["0", "1"], tpu_chips=False)
  assert plan == distributed.Plan("flags", "10.0.0.2:1234", 4, 3, (0, 1))
  assert distributed.detect(env, tpu_chips=False) is None  # a laptop: one process
  assert distributed.detect(env, mode="on", tpu_chips=False) == distributed.Plan("forced")
  assert distributed.detect({"SLURM_NTASKS": "8"}, mode="off", tpu_chips=False) is None
  for kwargs, match in [
      (dict(coordinator="10.0.0.2", num_processes=2, process_id=0), "must be host:port"),
      (dict(coordinator="h:1", num_processes=2), "needs --num_processes and --process_id"),
      (dict(coordinator="h:1", num_processes=2, process_id=2), r"must lie in \[0, --num_processes=2\)"),
      (dict(num_processes=2, process_id=0), "need --coordinator"),
      (dict(mode="off", coordinator="h:1", num_processes=2, process_id=0), "contradicts"),
      (dict(mode="sometimes"), "expected one of"),
  ]:
    with pytest.raises(distributed.DistributedInitError, match=match):
      distributed.detect(env, tpu_chips=False, **kwargs)


def test_detect_cluster_environments():
  slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
           "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
  assert distributed.detect(slurm, tpu_chips=False) == distributed.Plan("slurm")  # one GPU per task: jax's default
  per_node = dict(slurm, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
  assert distributed.detect(per_node, tpu_chips=False) == distributed.Plan("slurm", local_device_ids=tuple(range(8)))
  assert distributed.detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, tpu_chips=False) is None
  with pytest.raises(distributed.DistributedInitError, match="not started by `srun`"):
    distributed.detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, tpu_chips=False)
  assert distributed.detect({"OMPI_COMM_WORLD_SIZE": "4"}, tpu_chips=False) == distributed.Plan("ompi")
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, tpu_chips=False) == distributed.Plan("tpu")
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a"}, tpu_chips=False) is None
  assert distributed.detect({"MEGASCALE_NUM_SLICES": "2"}, tpu_chips=False) == distributed.Plan("tpu")
  assert distributed.detect({}, tpu_chips=True) == distributed.Plan("tpu")  # a TPU VM: ask the metadata server


def _main(*args, timeout=120):
  env = mh.cpu_env(1)
  return subprocess.run([sys.executable, "-m", "jaxdpo.main", "--config", mh.CONFIG, "--workdir", "/nonexistent/x",
                         *args], cwd=mh.ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_unreachable_coordinator_fails_clearly():
  port = mh.free_port()
  r = _main(f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=1", "--distributed_timeout_s=2")
  assert r.returncode == 2, r.stderr[-2000:]
  assert f"error: could not reach the JAX coordinator at 127.0.0.1:{port} within 2s" in r.stderr
  assert "check that process 0 is running" in r.stderr


def test_missing_peers_are_named_before_the_runtime_aborts():
  port = mh.free_port()
  r = _main(f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=0", "--distributed_timeout_s=4")
  assert r.returncode != 0
  assert "has not completed after 4s" in r.stderr
  assert f"this is process 0, serving the coordinator at 127.0.0.1:{port}" in r.stderr
