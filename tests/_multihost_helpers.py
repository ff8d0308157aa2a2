"""Helpers for multi-process tests: N `python -m jaxdpo.main` processes joined by jax.distributed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from tests._dpo_helpers import ROOT

CONFIG = os.path.join(ROOT, "configs", "tiny_dpo.py")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
  """The environment of one CPU process with `devices` fake devices (the test's own 8 overridden)."""
  env = dict(os.environ)
  env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
              "PYTHONUNBUFFERED": "1"})
  for key in list(env):
    if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
      del env[key]  # the runs must not pick up a cluster the test machine happens to be in
  return env


def main_cmd(workdir, *args, config: str = CONFIG) -> list[str]:
  return [sys.executable, "-m", "jaxdpo.main", "--config", config, "--workdir", str(workdir),
          "--config.train.progress=False", *args]


def run_processes(workdir, num_processes: int, devices_each: int, *args, timeout: int = 600,
                  distributed_timeout_s: int = 120):
  """Runs `num_processes` trainer processes on localhost; returns [(returncode, stdout, stderr)].

  Process 0 hosts the coordinator on a free port. If any process fails, the others are killed,
  so a broken run cannot hang the test.
  """
  port = free_port()
  procs = []
  logs = []
  for i in range(num_processes):
    extra = [] if num_processes == 1 else [f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
                                           f"--process_id={i}", f"--distributed_timeout_s={distributed_timeout_s}"]
    out = open(os.path.join(str(workdir) + f".p{i}.out"), "w+")
    err = open(os.path.join(str(workdir) + f".p{i}.err"), "w+")
    logs.append((out, err))
    procs.append(subprocess.Popen(main_cmd(workdir, *args, *extra), cwd=ROOT, env=cpu_env(devices_each),
                                  stdout=out, stderr=err, text=True))
  results = []
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: the rest would only wait for it
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (out, err) in zip(procs, logs):
    out.seek(0)
    err.seek(0)
    results.append((p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results


def assert_ok(results):
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{err[-4000:]}"
