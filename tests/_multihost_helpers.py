"""Helpers for multi-process tests: N `python -m jaxdpo.main` processes joined by jax.distributed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from tests import _xla_flags
from tests._dpo_helpers import ROOT

CONFIG = os.path.join(ROOT, "configs", "tiny_dpo.py")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
  """The environment of one CPU process with `devices` fake devices (the test's own 8 overridden)."""
  env = dict(os.environ)
  env.update({"XLA_FLAGS": _xla_flags.with_devices(devices),
              "JAX_PLATFORMS": "cpu",
              "PYTHONUNBUFFERED": "1"})
  for key in list(env):
    if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
      del env[key]  # the runs must not pick up a cluster the test machine happens to be in
  return env


def main_cmd(workdir, *args, config: str = CONFIG) -> list[str]:
  return [sys.executable, "-m", "jaxdpo.main", "--config", config, "--workdir", str(workdir),
          "--config.train.progress=False", *args]


class Run:
  """`num_processes` trainer processes on localhost, started together (process 0 hosts the coordinator)."""

  def __init__(self, workdir, num_processes: int, devices_each: int, *args, distributed_timeout_s: int = 120,
               config: str = CONFIG):
    port = free_port()
    self.procs, self.logs = [], []
    for i in range(num_processes):
      extra = [] if num_processes == 1 else [f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
                                             f"--process_id={i}", f"--distributed_timeout_s={distributed_timeout_s}"]
      out = open(f"{workdir}.p{i}.out", "w+")
      err = open(f"{workdir}.p{i}.err", "w+")
      self.logs.append((out, err))
      self.procs.append(subprocess.Popen(main_cmd(workdir, *args, *extra, config=config), cwd=ROOT,
                                         env=cpu_env(devices_each), stdout=out, stderr=err, text=True))

  def wait(self, timeout: int = 900):
    """Waits for every process; returns [(returncode, stdout, stderr)].

    If one process fails the others are killed at once (they would only wait for it in a
    collective), so a broken run cannot hang the test.
    """
    deadline = time.monotonic() + timeout
    try:
      while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in self.procs):
          break
        time.sleep(0.2)
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    results = []
    for p, (out, err) in zip(self.procs, self.logs):
      out.seek(0)
      err.seek(0)
      results.append((p.returncode, out.read(), err.read()))
      out.close()
      err.close()
    return results


def run_processes(workdir, num_processes: int, devices_each: int, *args, timeout: int = 900, **kw):
  """Starts a `Run` and waits for it."""
  return Run(workdir, num_processes, devices_each, *args, **kw).wait(timeout)


def final_state(workdir, step: int):
  """The checkpointed train state at `step`, restored onto one local device as plain arrays."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.join(str(workdir), "checkpoints", str(step), "state"))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    return jax.device_get(ckptr.restore(path, target))


def assert_ok(results):
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{err[-4000:]}"
