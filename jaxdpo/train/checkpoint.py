"""Training checkpoints with orbax: train state (params, optimizer state, step) + data iterator.

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never shadows the previous good checkpoint. All hosts take part in saves
and restores (orbax coordinates them); only the array shards a host owns are written by it.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items jaxdpo saves."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 100):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False):
    """Saves (asynchronously); `wait()` before exiting."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state):
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); returns (state, data_state)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      args["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], (out["data"] if has_data else None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
