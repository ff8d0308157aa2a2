"""grain pipelines: shuffle, per-host shard, batch and pad into fixed-shape numpy batches.

Every batch is padded to `max_length`, so the step compiles once. Segment ids mark real
tokens (1) and padding (0); `loss_mask` marks completion tokens. The iterator is grain's
checkpointable `DatasetIterator`: its `get_state()` goes into every orbax checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import numpy as np

from jaxdpo.data import packing, shared_rows
from jaxdpo.data.tokenize import TokenizedPair
from jaxdpo.errors import DataError


def _row(prompt: list[int], completion: list[int], t: int, pad_id: int):
  ids = np.full((t,), pad_id, np.int32)
  seg = np.zeros((t,), np.int32)
  pos = np.zeros((t,), np.int32)
  mask = np.zeros((t,), np.int32)
  seq = prompt + completion
  n = len(seq)
  ids[:n] = seq
  seg[:n] = 1
  pos[:n] = np.arange(n)
  mask[len(prompt):n] = 1
  return ids, seg, pos, mask


def collate_pairs(pairs: Sequence[TokenizedPair], *, max_length: int, pad_id: int,
                  vision=None) -> dict[str, np.ndarray]:
  """Stacks pairs into the step's [B, 2, T] layout (see `jaxdpo.objectives.dpo_step`).

  `vision` (a `multimodal.VisionAdapter` with its budget fixed) adds each pair's images once,
  with a leading pair axis (see `jaxdpo.models.batching`).
  """
  b = len(pairs)
  out = {k: np.zeros((b, 2, max_length), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask")}
  for i, p in enumerate(pairs):
    for j, completion in enumerate((p.chosen, p.rejected)):
      ids, seg, pos, mask = _row(p.prompt, completion, max_length, pad_id)
      out["input_ids"][i, j], out["segment_ids"][i, j] = ids, seg
      out["positions"][i, j], out["loss_mask"][i, j] = pos, mask
  if pairs and all(p.ref_logps is not None for p in pairs):
    out["ref_logps"] = np.asarray([p.ref_logps for p in pairs], np.float32)
  if vision is not None:
    out.update(vision.collate(pairs, out, pairs=True))
  return out


def collate_shared(pairs: Sequence[TokenizedPair], *, max_length: int, pad_id: int, length: int, slots: int,
                   vision=None) -> dict[str, np.ndarray]:
  """Pairs in the prefix-shared layout, one row [P | C | R] each (`jaxdpo.data.shared_rows`).

  `length` and `slots` (from `shared_rows.shape_for` over the run's pairs) fix the shape, so the
  step compiles once; the two-row batch is built first and converted, images included.
  """
  two_row = collate_pairs(pairs, max_length=max_length, pad_id=pad_id, vision=vision)
  return shared_rows.from_pairs(two_row, [len(p.prompt) for p in pairs], length=length, slots=slots)


def collate_packed(pairs: Sequence[TokenizedPair], *, max_length: int, pad_id: int, pack_tokens: int,
                   row_multiple: int = 1, vision=None) -> dict[str, np.ndarray]:
  """Pairs packed several per row up to `pack_tokens` (`jaxdpo.data.packing`); the leading axis is
  packed rows, a multiple of `row_multiple` (batch devices x micro-batches). With `vision`, each
  row carries its pairs' images, one pair slot each."""
  two_row = collate_pairs(pairs, max_length=max_length, pad_id=pad_id, vision=vision)
  return packing.pack(two_row, [len(p.prompt) for p in pairs], pack_tokens=pack_tokens, row_multiple=row_multiple)


def make_iterator(examples: Sequence, *, batch_size: int, collate: Callable, seed: int, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                  host_rows: Sequence[int] | None = None):
  """An endless (or `num_epochs`) checkpointable iterator of host-local batches.

  Two ways to split data over hosts:
    * `host_rows` given (the DPO job's choice): `batch_size` is the *global* batch. Every host
      walks the same globally shuffled order and collates only the rows of each global batch
      that its devices hold (`jaxdpo.parallel.distributed.host_rows`). The global batch at every step is
      then the same for any number of processes, so a 2-host run reproduces a 1-host run, and
      every host's iterator state is identical (one saved copy restores them all).
    * otherwise: `batch_size` is the host-local batch and host `i` reads examples
      `i::process_count`, shuffled independently (global batches depend on the process count).

  Args:
    examples: tokenized examples (all hosts see the same list).
    batch_size: the global batch with `host_rows`, else the host-local batch.
    collate: list of examples -> dict of numpy arrays.
    seed: shuffle seed; each epoch is reshuffled.
    shuffle: whether to shuffle.
    process_index, process_count: this host's shard of the examples (without `host_rows`).
    num_epochs: None repeats forever.
    host_rows: rows of each global batch that this host supplies, in increasing order.
  """
  ds = grain.MapDataset.source(list(examples))
  if host_rows is None:
    ds = ds[process_index::process_count]
    if len(ds) < batch_size:
      raise DataError(f"only {len(ds)} examples on host {process_index}, fewer than the local batch {batch_size}")
  else:
    rows = [int(r) for r in host_rows]
    if len(ds) < batch_size:
      raise DataError(f"only {len(ds)} examples, fewer than the global batch {batch_size}")
    if not rows or min(rows) < 0 or max(rows) >= batch_size:
      raise ValueError(f"host_rows {rows[:8]}... do not select rows of a batch of {batch_size}")
    if rows != list(range(batch_size)):
      whole = collate
      collate = lambda batch: whole([batch[r] for r in rows])
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=collate)
  return iter(ds.to_iter_dataset())


def collate_seqs(seqs: Sequence, *, max_length: int, pad_id: int, vision=None) -> dict[str, np.ndarray]:
  """Stacks prompt+completion sequences into [B, T] arrays (right-padded; SFT), plus their images
  when `vision` is given (as in `collate_pairs`)."""
  b = len(seqs)
  out = {k: np.zeros((b, max_length), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask")}
  for i, s in enumerate(seqs):
    ids, seg, pos, mask = _row(s.prompt, s.completion, max_length, pad_id)
    out["input_ids"][i], out["segment_ids"][i], out["positions"][i], out["loss_mask"][i] = ids, seg, pos, mask
  if vision is not None:
    out.update(vision.collate(seqs, out, pairs=False))
  return out


def collate_generation(seqs: Sequence, *, length: int, pad_id: int, vision=None) -> dict[str, np.ndarray]:
  """Left-padded prompts (`collate_prompts_left`) of tokenized prompts, plus their images when
  `vision` is given (batch layout of `jaxdpo.models.batching`, sequence form)."""
  out = collate_prompts_left([s.prompt for s in seqs], length=length, pad_id=pad_id)
  if vision is not None:
    out.update(vision.collate(seqs, out, pairs=False))
  return out


def collate_prompts_left(prompts: Sequence[Sequence[int]], *, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Left-pads prompts for generation: input_ids and segment_ids [B, length]."""
  b = len(prompts)
  ids = np.full((b, length), pad_id, np.int32)
  seg = np.zeros((b, length), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt of {len(p)} tokens is longer than the padded length {length}")
    if len(p):
      ids[i, length - len(p):] = p
      seg[i, length - len(p):] = 1
  return {"input_ids": ids, "segment_ids": seg}
