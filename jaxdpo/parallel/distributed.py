"""Multi-host start-up: decide whether this run spans several processes and join JAX's runtime.

jaxdpo runs one process per host (or per GPU) under JAX's own multi-controller runtime; every
process runs the same program and `jax.distributed.initialize` connects them. This module only
decides *whether* and *with what arguments* to call it:

  1. explicit flags: `--coordinator=host:port --num_processes=N --process_id=I`;
  2. SLURM: `SLURM_NTASKS` > 1 inside an `srun` step (jax reads the rest of the SLURM variables);
  3. Open MPI: `OMPI_COMM_WORLD_SIZE` > 1 (jax reads the ORTE variables);
  4. Cloud TPU: multi-host hints in the environment (`TPU_WORKER_HOSTNAMES` or
     `TPU_PROCESS_ADDRESSES` with several hosts, `MEGASCALE_*`), or TPU chips on this machine,
     in which case jax asks the TPU metadata server for the slice layout;
  5. otherwise a single process: nothing to do.

`--distributed=on` forces step 4's auto-detection (for TPU VMs whose environment carries no
hint); `--distributed=off` skips everything.

A failed start must say what to check. The coordination service aborts the process (it does
not raise) when its connection deadline passes, so the checks that can fail are made first in
Python: a non-coordinator process probes the coordinator's TCP port, and a watchdog prints the
diagnosis just before the runtime's own deadline.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from jaxdpo.errors import DistributedInitError  # noqa: F401  (raised here; kept importable from here)

log = logging.getLogger("jaxdpo")

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Arguments for `jax.distributed.initialize`; None means "let jax detect it".

  Attributes:
    source: what asked for a multi-process run ("flags", "slurm", "ompi", "tpu", "forced").
    coordinator: "host:port" of process 0's coordination service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: accelerator ids this process drives (GPU); None = jax's default.
  """

  source: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def describe(self) -> str:
    parts = [f"source={self.source}"]
    for name in ("coordinator", "num_processes", "process_id", "local_device_ids"):
      value = getattr(self, name)
      if value is not None:
        parts.append(f"{name}={value}")
    return " ".join(parts)


def _int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "")
  try:
    return int(value)
  except ValueError:
    return None


def _tpu_chips_present() -> bool:
  """Whether this machine has TPU chips (a Cloud TPU VM), without starting a backend."""
  try:
    from jax._src import hardware_utils  # private; guarded because it may move
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # noqa: BLE001  (any failure means "cannot tell": fall back to device files)
    return bool(glob.glob("/dev/accel[0-9]*"))  # TPU VMs expose their chips as /dev/accelN


def _check_coordinator(coordinator: str) -> tuple[str, int]:
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedInitError(f"--coordinator={coordinator!r} must be host:port (e.g. 10.0.0.2:1234)")
  return host.strip("[]"), int(port)


def _slurm_plan(env: Mapping[str, str], local_device_ids) -> Plan | None:
  ntasks = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
  if not ntasks or ntasks <= 1:
    return None
  if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
    raise DistributedInitError(
        f"SLURM_NTASKS={ntasks} but this process was not started by `srun` (no SLURM_STEP_NODELIST/"
        "SLURM_PROCID): launch the trainer with `srun python -m jaxdpo.main ...` (see launch/gpu_slurm.sbatch)")
  if local_device_ids is None:
    # jax gives each SLURM task one GPU (its local rank). With one task per node the task must
    # drive every GPU of the node instead.
    nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES")
    gpus = _int(env, "SLURM_GPUS_ON_NODE")
    if nodes and ntasks == nodes and gpus and gpus > 1:
      local_device_ids = tuple(range(gpus))
  return Plan("slurm", local_device_ids=local_device_ids)


def _tpu_multi_host_hint(env: Mapping[str, str]) -> bool:
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  return bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")) or (_int(env, "MEGASCALE_NUM_SLICES") or 1) > 1


def detect(env: Mapping[str, str] | None = None, *, mode: str = "auto", coordinator: str = "",
           num_processes: int | None = None, process_id: int | None = None,
           local_device_ids: Sequence[int] | None = None, tpu_chips: bool | None = None) -> Plan | None:
  """Decides whether (and how) to call `jax.distributed.initialize`; None = single process.

  Args:
    env: the environment (default `os.environ`).
    mode: "auto" (detect), "on" (always initialise, letting jax detect what the flags leave
      unset), "off" (never).
    coordinator, num_processes, process_id, local_device_ids: the explicit flags.
    tpu_chips: whether TPU chips are present (default: probe this machine).

  Raises:
    DistributedInitError: on inconsistent flags or a half-configured cluster environment.
  """
  env = os.environ if env is None else env
  if mode not in MODES:
    raise DistributedInitError(f"--distributed={mode!r}; expected one of {MODES}")
  ids = tuple(int(i) for i in local_device_ids) if local_device_ids else None
  if mode == "off":
    if coordinator:
      raise DistributedInitError("--distributed=off contradicts --coordinator; drop one of them")
    return None
  if coordinator:
    _check_coordinator(coordinator)
    if num_processes is None or process_id is None:
      raise DistributedInitError("--coordinator needs --num_processes and --process_id as well")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedInitError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    return Plan("flags", coordinator, num_processes, process_id, ids)
  if num_processes is not None or process_id is not None:
    raise DistributedInitError("--num_processes/--process_id need --coordinator=host:port (the address of "
                               "process 0); on SLURM or Cloud TPU leave all three unset")
  if mode == "on":
    return Plan("forced", local_device_ids=ids)
  plan = _slurm_plan(env, ids)
  if plan is not None:
    return plan
  if (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return Plan("ompi", local_device_ids=ids)
  if _tpu_multi_host_hint(env) or (tpu_chips if tpu_chips is not None else _tpu_chips_present()):
    # On a TPU VM jax reads the slice layout from the metadata server; a one-host slice simply
    # yields one process.
    return Plan("tpu")
  return None


def _probe(host: str, port: int, deadline: float) -> str | None:
  """Retries a TCP connection until `deadline`; returns the last error, or None once it connects."""
  err = "no attempt made"
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        return None
    except OSError as e:
      err = f"{type(e).__name__}: {e}"
    if time.monotonic() >= deadline:
      return err
    time.sleep(0.25)


def _advice(plan: Plan, timeout_s: int) -> str:
  n = plan.num_processes or "N"
  common = (f"that all {n} processes got the same --coordinator and --num_processes={n} with distinct "
            f"--process_id values, and that they start within --distributed_timeout_s={timeout_s}s of each other")
  if plan.process_id == 0:
    return (f"this is process 0, serving the coordinator at {plan.coordinator}: the other processes did not all "
            f"connect; check that they are running, that this host:port is reachable from their hosts (firewall, "
            f"no HTTP(S)_PROXY variables intercepting it), {common}")
  where = plan.coordinator or f"the address jax derives for {plan.source}"
  return (f"check that process 0 is running and reachable at {where} (port open in the firewall, no "
          f"HTTP(S)_PROXY variables intercepting it), {common}")


def initialize(plan: Plan, timeout_s: int = 300) -> None:
  """Starts (process 0) or joins the coordination service; returns once every process has joined.

  Raises:
    DistributedInitError: the coordinator cannot be reached in `timeout_s` seconds, or jax
      rejected the arguments.
  """
  import jax
  start = time.monotonic()
  # Cross-process collectives on CPU (tests, CPU clusters) go through gloo; accelerators ignore it.
  if "jax_cpu_collectives_implementation" in jax.config.values:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if plan.coordinator and plan.process_id not in (None, 0):
    host, port = _check_coordinator(plan.coordinator)
    err = _probe(host, port, start + timeout_s)
    if err is not None:
      raise DistributedInitError(f"could not reach the JAX coordinator at {plan.coordinator} within {timeout_s}s "
                                 f"({err}); {_advice(plan, timeout_s)}")
  remaining = max(5, int(timeout_s - (time.monotonic() - start)))
  # Past its deadline the runtime aborts the process from C++ (no Python exception), so say what
  # to check just before that happens.
  watchdog = threading.Timer(max(1.0, remaining - 1.0), lambda: print(
      f"error: JAX distributed start-up ({plan.describe()}) has not completed after {timeout_s}s and is about "
      f"to abort; {_advice(plan, timeout_s)}", file=sys.stderr, flush=True))
  watchdog.daemon = True
  watchdog.start()
  kwargs = dict(coordinator_address=plan.coordinator, num_processes=plan.num_processes, process_id=plan.process_id,
                local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
                initialization_timeout=remaining)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    raise DistributedInitError(f"jax.distributed.initialize failed ({plan.describe()}): {e}; "
                               f"{_advice(plan, timeout_s)}") from e
  finally:
    watchdog.cancel()
  log.info("joined the JAX runtime as process %d of %d (%s)", jax.process_index(), jax.process_count(),
           plan.describe())


def maybe_initialize(*, mode: str = "auto", coordinator: str = "", num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                     timeout_s: int = 300) -> Plan | None:
  """`detect` + `initialize`; call before any jax computation. Returns the plan (None = one process)."""
  plan = detect(mode=mode, coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                local_device_ids=local_device_ids)
  if plan is not None:
    initialize(plan, timeout_s)
  return plan


def host_rows(mesh, global_batch: int, rules=None) -> list[int]:
  """Rows of a global batch that this process supplies to `jax.make_array_from_process_local_data`.

  The batch's leading axis is sharded over the batch mesh axes; each process passes the rows
  its own devices hold, in increasing order (that is how `make_array_from_process_local_data`
  lays host data onto devices). With one process this is every row.
  """
  from jaxdpo.parallel import sharding as shd
  sh = shd.batch_sharding(mesh, 1, rules or shd.DEFAULT_RULES)
  rows: set[int] = set()
  for index in sh.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  return sorted(rows)
