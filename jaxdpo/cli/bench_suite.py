"""`python -m jaxdpo.bench --suite`: jaxdpo and the TRL peer on every workload, in one run.

  python -m jaxdpo.bench --suite --run-peer ../shared/bench/trl_dpo_peer.py            # H200
  python -m jaxdpo.bench --suite --workloads tiny --run-peer ../shared/bench/trl_dpo_peer.py  # CPU

Each measurement runs in its own subprocess, so one run's device memory (and one framework's
allocator) never carries into the next, and a run that fails (out of memory, a missing package)
is reported as a row with its error instead of ending the suite. Every run prints its JSON line
as it finishes; the suite ends with one ratio table (ours / peer, measured in this same run) and
the issue's targets. The peer runs with its best settings from `shared/bench/README.md`
(`PEER_BEST`); when `liger_kernel` is not importable the peer runs without Liger and the row says so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time

# Issue 17's targets (pairs/s on one H200) and the peer's best H200 figures from shared/bench/README.md.
TARGETS = {"uniform-1k": 15.8, "ocr-2k": 9.0, "uniform-1k-gemma": 9.4}
PEER_README_BEST = {"uniform-1k": 10.50, "ocr-2k": 3.61, "uniform-1k-gemma": 6.24}
# The peer's fastest settings per workload (shared/bench/README.md): without checkpointing only
# uniform-1k fits; the other two run out of memory at 141 GB without it.
PEER_BEST = {"uniform-1k": {"grad_ckpt": 0, "liger": 1}, "ocr-2k": {"grad_ckpt": 1, "liger": 1},
             "uniform-1k-gemma": {"grad_ckpt": 1, "liger": 1}}
FULL_SIZE = ("uniform-1k", "ocr-2k", "uniform-1k-gemma")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """What one suite run measures.

  Attributes:
    workloads: workload names of `jaxdpo.cli.bench.WORKLOADS`.
    steps, warmup, batch: passed to both sides (the peer times `steps` after its own 2 warm-up steps).
    reference: "model" (live reference, the headline figure) or "cached".
    peer_script: path of `trl_dpo_peer.py`; None runs jaxdpo alone.
    timeout_s: per-run limit in seconds.
    extra_args: more `python -m jaxdpo.bench` arguments for jaxdpo's runs.
  """

  workloads: tuple[str, ...] = FULL_SIZE
  steps: int = 10
  warmup: int = 2
  batch: int = 8
  reference: str = "model"
  peer_script: str | None = None
  timeout_s: float = 300.0
  extra_args: tuple[str, ...] = ()


def peer_command(script: str, workload: str, cfg: SuiteConfig, liger_available: bool) -> tuple[list[str], dict]:
  """The peer's command line for `workload` at its best settings, and the settings used."""
  from jaxdpo.cli import bench
  best = dict(PEER_BEST.get(workload, {"grad_ckpt": 0, "liger": 0}))
  if best["liger"] and not liger_available:
    best["liger"] = 0
    best["note"] = "liger_kernel not installed: peer ran without Liger"
  w = bench.WORKLOADS[workload]()
  cmd = [sys.executable, script, *w.peer_args, "--batch", str(cfg.batch), "--steps", str(cfg.steps + 2),
         "--grad-ckpt", str(best["grad_ckpt"]), "--liger", str(best["liger"]),
         "--precompute-ref", "1" if cfg.reference == "cached" else "0"]
  return cmd, best


def ours_command(workload: str, cfg: SuiteConfig) -> list[str]:
  """jaxdpo's bench command line for `workload`."""
  return [sys.executable, "-m", "jaxdpo.bench", "--workload", workload, "--steps", str(cfg.steps), "--warmup",
          str(cfg.warmup), "--batch", str(cfg.batch), "--reference", cfg.reference, *cfg.extra_args]


def _run_json(cmd: list[str], timeout_s: float) -> dict:
  """Runs `cmd`; its last stdout line parsed as JSON, or a row with the error."""
  t0 = time.perf_counter()
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": time.perf_counter() - t0}
  wall = time.perf_counter() - t0
  lines = [line for line in r.stdout.strip().splitlines() if line.startswith("{")]
  if r.returncode != 0 or not lines:
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {r.returncode}: " + " | ".join(tail), "wall_s": wall}
  row = json.loads(lines[-1])
  row["wall_s"] = wall
  return row


def ratio_table(rows: list[dict]) -> str:
  """A markdown table: per workload, ours vs the peer measured in the same run, and the targets."""
  head = ("| workload | jaxdpo pairs/s | peer pairs/s | ratio | target | TRL best (README) | jaxdpo MFU "
          "| jaxdpo peak GB | jaxdpo first step s |")
  out = [head, "| " + " | ".join(["---"] * 9) + " |"]
  by = {}
  for row in rows:
    by.setdefault(row["workload"], {})[row["side"]] = row

  def fmt(x, spec):
    return "" if x is None else format(x, spec)

  def err(side):  # a failed run's reason, kept to one table cell
    return side.get("error", "").replace("|", "/")[:120]

  for workload, sides in by.items():
    ours, peer = sides.get("jaxdpo", {}), sides.get("peer", {})
    a, b = ours.get("pairs_per_s"), peer.get("pairs_per_s")
    out.append(f"| {workload} | {fmt(a, '.2f') or err(ours)} | {fmt(b, '.2f') or err(peer)} "
               f"| {fmt(a / b if a and b else None, '.2f')} | {fmt(TARGETS.get(workload), '.1f')} "
               f"| {fmt(PEER_README_BEST.get(workload), '.2f')} | {fmt(ours.get('mfu_vs_peak'), '.1%')} "
               f"| {fmt(ours.get('peak_mem_gb'), '.1f')} | {fmt(ours.get('first_step_s'), '.1f')} |")
  return "\n".join(out)


def run_suite(cfg: SuiteConfig, emit=print) -> list[dict]:
  """Runs jaxdpo, then the peer, for each workload; emits one JSON line per run, then the table."""
  liger = importlib.util.find_spec("liger_kernel") is not None
  rows = []
  for workload in cfg.workloads:
    row = {"side": "jaxdpo", "workload": workload, **_run_json(ours_command(workload, cfg), cfg.timeout_s)}
    row["workload"] = workload
    rows.append(row)
    emit(json.dumps(row))
    if cfg.peer_script:
      cmd, settings = peer_command(cfg.peer_script, workload, cfg, liger)
      row = {"side": "peer", "workload": workload, "peer_settings": settings, **_run_json(cmd, cfg.timeout_s)}
      row["workload"] = workload  # the peer's own "workload" field is uniform|ocr
      rows.append(row)
      emit(json.dumps(row))
  emit(ratio_table(rows))
  return rows
