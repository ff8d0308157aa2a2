"""Generation over a device mesh and across hosts: the batch split on the data axes, outputs gathered.

Parameters stay where training (or `model_setup.setup_model`) placed them: sharded by the
logical-axis rules (fsdp, tensor). The prompt batch is split over the batch mesh axes
(`data` x `fsdp`) exactly like a training batch, so each device (and so each host) decodes
only its own rows. The outputs are then replicated across the mesh and copied to the host, so
every process holds every row in batch order (process 0 writes them).

Every process must build the same global batch (same records, same order): each one passes
only the rows its devices hold (`jaxdpo.parallel.distributed.host_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdpo.parallel import distributed as dist
from jaxdpo.parallel import sharding as shd

log = logging.getLogger("jaxdpo")


def padded_batch(batch_size: int, mesh) -> int:
  """The batch the mesh decodes: `batch_size` rounded up to a multiple of the data axes."""
  div = shd.batch_divisor(mesh)
  return -(-batch_size // div) * div


def place_inputs(inputs: dict, mesh) -> dict:
  """Global arrays for one generation batch that every process holds whole (host numpy).

  Arrays whose leading axis is the batch (`input_ids`'s) are split over the batch axes, each
  process supplying its own rows; anything else (e.g. image bookkeeping laid out per image) is
  replicated.
  """
  b = np.shape(inputs["input_ids"])[0]
  rows = np.asarray(dist.host_rows(mesh, b))
  out = {}
  for k, v in inputs.items():
    v = np.asarray(v)
    if v.ndim and v.shape[0] == b:
      out[k] = jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v[rows])
    else:
      out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), v)
  return out


def generate(generate_fn: Callable, model, inputs: dict, *, mesh=None, **kwargs):
  """`generate_fn(model, inputs, **kwargs)` with the batch on `mesh`; its outputs as host numpy.

  Args:
    generate_fn: `jaxdpo.generation.decode.generate` (or anything with its signature and a
      pytree of [B, ...] / scalar outputs).
    model: the nnx model; its parameters may be sharded on `mesh` (any process layout).
    inputs: the whole batch as host arrays, identical on every process.
    mesh: the device mesh; None runs on the default device as before (no placement).
    **kwargs: passed to `generate_fn`.

  Returns:
    `generate_fn`'s output with every leaf a numpy array holding all rows, on every process.
  """
  if mesh is None:
    return jax.device_get(generate_fn(model, inputs, **kwargs))
  b = np.shape(inputs["input_ids"])[0]
  padded = padded_batch(b, mesh)
  if padded != b:
    # A batch the data axes cannot split gets copies of its last row (decoded independently,
    # then dropped), so any `generate.batch_size` runs on any mesh.
    _warn_once(b, padded, mesh)
    inputs = {k: _pad_rows(np.asarray(v), b, padded) for k, v in inputs.items()}
  placed = place_inputs(inputs, mesh)
  with jax.set_mesh(mesh):  # activation constraints (`layers.constrain_batch`) keep the rows split
    out = generate_fn(model, placed, **kwargs)
    out = _replicate(out, mesh)
  out = jax.device_get(out)
  return jax.tree.map(lambda x: x[:b] if np.ndim(x) and np.shape(x)[0] == padded else x, out)


def _pad_rows(v: np.ndarray, b: int, padded: int) -> np.ndarray:
  if not v.ndim or v.shape[0] != b:
    return v
  return np.concatenate([v, np.repeat(v[-1:], padded - b, axis=0)])


_WARNED: set = set()


def _warn_once(b: int, padded: int, mesh) -> None:
  if (b, padded) not in _WARNED:
    _WARNED.add((b, padded))
    log.warning("generation batch %d does not divide the data axes of mesh %s (data x fsdp = %d): each batch "
                "is padded to %d rows; a config.generate.batch_size that is a multiple of %d wastes none",
                b, dict(mesh.shape), shd.batch_divisor(mesh), padded, shd.batch_divisor(mesh))


def _replicate(tree, mesh):
  """Every leaf copied onto every device of `mesh`, so each process can read all rows."""
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
