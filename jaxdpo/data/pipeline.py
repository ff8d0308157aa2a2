"""grain pipelines: shuffle, per-host shard, batch and pad into fixed-shape numpy batches.

Every batch is padded to `max_length`, so the step compiles once. Segment ids mark real
tokens (1) and padding (0); `loss_mask` marks completion tokens. The iterator is grain's
checkpointable `DatasetIterator`: its `get_state()` goes into every orbax checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import numpy as np

from jaxdpo.data.tokenize import TokenizedPair


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


def collate_pairs(pairs: Sequence[TokenizedPair], *, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Stacks pairs into the step's [B, 2, T] layout (see `jaxdpo.dpo.step`)."""
  b = len(pairs)
  out = {k: np.zeros((b, 2, max_length), np.int32) for k in ("input_ids", "segment_ids", "positions", "loss_mask")}
  for i, p in enumerate(pairs):
    for j, completion in enumerate((p.chosen, p.rejected)):
      ids, seg, pos, mask = _row(p.prompt, completion, max_length, pad_id)
      out["input_ids"][i, j], out["segment_ids"][i, j] = ids, seg
      out["positions"][i, j], out["loss_mask"][i, j] = pos, mask
  if pairs and all(p.ref_logps is not None for p in pairs):
    out["ref_logps"] = np.asarray([p.ref_logps for p in pairs], np.float32)
  return out


def make_iterator(examples: Sequence, *, batch_size: int, collate: Callable, seed: int, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
  """An endless (or `num_epochs`) checkpointable iterator of host-local batches.

  Args:
    examples: tokenized examples (all hosts see the same list; each takes its own slice).
    batch_size: the *host-local* batch size (global batch / process count).
    collate: list of examples -> dict of numpy arrays.
    seed: shuffle seed; each epoch is reshuffled.
    shuffle: whether to shuffle.
    process_index, process_count: this host's shard of the examples.
    num_epochs: None repeats forever.
  """
  ds = grain.MapDataset.source(list(examples))
  ds = ds[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"only {len(ds)} examples on host {process_index}, fewer than the local batch {batch_size}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=collate)
  return iter(ds.to_iter_dataset())
