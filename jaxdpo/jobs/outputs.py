"""Resumable outputs of the generation jobs (eval, mine): rows written in chunks, atomically.

The records are cut into chunks of `chunk_records` (fixed by the config). Each chunk is
generated on its own and written to `DIR/chunks/<job>/NNNNN.jsonl` (tmp + rename, by process
0), next to a `manifest.json` that holds what the rows depend on: the result-shaping config
keys and a digest of the records. A re-run in the same workdir reads the chunks already there,
generates only the rest, and merges them into the job's final files, which are then the same
as an uninterrupted run's (timing fields aside). Once the final files are written the chunk
directory is removed, so a later run with another config starts afresh as before.

Sampling must give the same samples on resume: chunk `c` is generated with its own seed,
derived from (`seed`, c) alone (`chunk_seed`), so what a chunk samples does not depend on
which chunks were generated before it in the same process.

A chunk directory left by a run with another config is refused, naming the changed keys.
Multi-host: the workdir is shared (as checkpoints need); process 0 reads and checks the chunk
directory and every process follows its verdict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxdpo.errors import ConfigError
from jaxdpo.jobs import defaults, jsonio, resume_config

log = logging.getLogger("jaxdpo")

MANIFEST = "manifest.json"

# Flattened config keys (or prefixes ending in ".") whose values shape the generated rows. Keys
# outside them (mesh, progress, training keys) may change between a run and its resume: the mesh
# does not change greedy outputs (tests/test_generation_scale.py), and nothing else is read.
ROW_KEYS = ("seed", "model.", "data.prompts", "data.split", "data.tokenizer", "data.truncation",
            "data.use_chat_template", "data.max_images", "data.max_patches", "generate.", "degeneration.")
# `generate.debug_kill_after_chunk` is run control (a test hook), not a result key.
RUN_CONTROL = frozenset({"generate.debug_kill_after_chunk"})


def row_config(config, extra: Sequence[str] = ()) -> dict:
  """The flattened config keys the rows depend on (`ROW_KEYS` plus `extra`)."""
  flat = resume_config.flatten(json.loads(config.to_json_best_effort()))
  keys = ROW_KEYS + tuple(extra)
  return {k: v for k, v in sorted(flat.items())
          if k not in RUN_CONTROL and any(k == p or (p.endswith(".") and k.startswith(p)) for p in keys)}


def records_digest(items) -> str:
  """sha256 of the records' fields and resolved images, in order (a changed prompts file shows)."""
  h = hashlib.sha256()
  for rec, seq in items:
    h.update(json.dumps([rec.fields, list(seq.images or ())], sort_keys=True, default=str).encode())
    h.update(b"\n")
  return h.hexdigest()


def chunk_seed(seed: int, chunk: int) -> int:
  """A 31-bit seed for chunk `chunk` of a run seeded with `seed` (independent of other chunks)."""
  state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(chunk)]).generate_state(1, dtype=np.uint32)[0]
  return int(state) & 0x7FFFFFFF


def chunk_records(config, num_samples: int = 1) -> int:
  """Records per chunk: `generate.chunk_batches` full batches of samples (at least one record)."""
  g = config.generate
  return max(1, int(g.chunk_batches) * int(g.batch_size) // max(1, int(num_samples)))


class ChunkStore:
  """The chunk directory of one job in one workdir."""

  def __init__(self, workdir: str, job: str):
    self.root = os.path.join(workdir, "chunks", job)

  def path(self, chunk: int) -> str:
    return os.path.join(self.root, f"{chunk:05d}.jsonl")

  def open(self, manifest: dict) -> int:
    """Creates the directory or checks the one there; returns how many chunks are done.

    Every process gets the same answer (process 0's). Raises `ConfigError` when the directory
    holds the partial output of a run with another manifest.
    """
    done, message = 0, ""
    if jax.process_index() == 0:
      try:
        done = self._open_local(manifest)
      except ConfigError as e:
        message = str(e)
    done, failed = _agree(done, int(bool(message)))
    if failed:
      raise ConfigError(message or f"process 0 refused the partial output in {self.root} (see its log)")
    return done

  def _open_local(self, manifest: dict) -> int:
    path = os.path.join(self.root, MANIFEST)
    if not os.path.exists(path):
      if os.path.isdir(self.root):
        shutil.rmtree(self.root)  # chunks without a manifest cannot be checked: never reused
      os.makedirs(self.root)
      jsonio.write_json(path, manifest)
      return 0
    with open(path) as f:
      saved = json.load(f)
    # A key added to jaxdpo since that run, left at its default, is no change (as for training).
    added = resume_config.flatten(json.loads(defaults.base().to_json_best_effort()))
    changed = resume_config.changed_keys(saved.get("config", {}), manifest["config"], added)
    problems = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()]
    for key, what in (("records", "number of records"), ("records_sha256", "records (data.prompts content)"),
                      ("chunk_records", "records per chunk")):
      if saved.get(key) != manifest[key]:
        problems.append(f"{what}: {saved.get(key)!r} -> {manifest[key]!r}")
    if problems:
      raise ConfigError(f"{self.root} holds the partial output of a {manifest['job']} run with another config; "
                        f"changed: {'; '.join(problems)}. Re-run with that run's config to finish it, or remove "
                        f"{self.root} (or use a new --workdir) to start over")
    done = 0
    while os.path.exists(self.path(done)):
      done += 1
    return done

  def read(self, chunk: int) -> list[dict]:
    try:
      with open(self.path(chunk)) as f:
        return [json.loads(line) for line in f]
    except FileNotFoundError as e:
      raise ConfigError(f"{self.path(chunk)} is missing on process {jax.process_index()}: a multi-host eval/mine "
                        f"resumes from a workdir every process can read (shared storage)") from e

  def write(self, chunk: int, rows: list[dict]) -> None:
    if jax.process_index() == 0:
      jsonio.write_jsonl(self.path(chunk), rows)

  def remove(self) -> None:
    """Drops the chunks once the final files hold every row."""
    if jax.process_count() > 1:  # no process may still be reading a saved chunk
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxdpo: {self.root} complete")
    if jax.process_index() == 0 and os.path.isdir(self.root):
      shutil.rmtree(self.root)
      parent = os.path.dirname(self.root)
      if not os.listdir(parent):
        os.rmdir(parent)


def generate_resumable(config, workdir: str, job: str, items, generate_chunk: Callable[[list, int], list[dict]], *,
                       num_samples: int = 1, extra_keys: Sequence[str] = ()) -> tuple[list[dict], ChunkStore]:
  """Every record's rows, in record order, generated chunk by chunk and saved as each chunk ends.

  Args:
    config: the job's config (reads `generate.chunk_batches`, `generate.debug_kill_after_chunk`
      and the keys of `row_config`).
    workdir: the job's workdir; chunks live in `DIR/chunks/<job>`.
    job: "eval" or "mine".
    items: the loaded records (`sampling.load_prompts`).
    generate_chunk: (the chunk's items, its seed) -> rows, whose `index` counts within the chunk.
    num_samples: rows per record (sizes the chunks).
    extra_keys: more config keys the rows depend on (mine's sampling keys).

  Returns:
    (rows with `index` counting over all records and `batch_id` unique over the run, the store;
    call `store.remove()` once the final files are written).
  """
  per = chunk_records(config, num_samples)
  n_chunks = -(-len(items) // per)
  store = ChunkStore(workdir, job)
  manifest = {"job": job, "records": len(items), "records_sha256": records_digest(items), "chunk_records": per,
              "config": row_config(config, extra_keys)}
  done = min(store.open(manifest), n_chunks)
  if done:
    log.info("%s: resuming from %s: %d of %d chunks (%d of %d records) already done", job, store.root, done,
             n_chunks, min(done * per, len(items)), len(items))
  rows: list[dict] = []
  kill_after = int(config.generate.debug_kill_after_chunk)
  for c in range(n_chunks):
    if c < done:
      rows += store.read(c)
      continue
    start = c * per
    part = generate_chunk(items[start:start + per], chunk_seed(config.seed, c))
    # Rows timed per batch carry a `batch_id` (the summary splits a batch's time over its rows):
    # keep it unique over the run. Rows timed on their own (`wall_time_s`) have none.
    offset = 1 + max((r["batch_id"] for r in rows if "batch_id" in r), default=-1)
    for r in part:
      r["index"] += start
      if "batch_id" in r:
        r["batch_id"] += offset
    store.write(c, part)
    rows += part
    if c == kill_after:
      # Test hook: die like a killed job (no cleanup, no final files) right after chunk `c` landed.
      log.warning("generate.debug_kill_after_chunk=%d: killing this process", c)
      _die()
  return rows, store


def _die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def _agree(*values: int) -> tuple[int, ...]:
  """Process 0's values, on every process."""
  if jax.process_count() == 1:
    return tuple(values)
  from jax.experimental import multihost_utils
  out = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))
  return tuple(int(v) for v in np.asarray(out))
