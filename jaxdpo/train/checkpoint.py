"""Training checkpoints with orbax: train state (params, optimizer state, step) + data iterator.

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never shadows the previous good checkpoint. All hosts take part in saves
and restores (orbax coordinates them); only the array shards a host owns are written by it.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from jaxdpo.errors import CheckpointError

log = logging.getLogger("jaxdpo")


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

  def restore_latest_complete(self, abstract_state):
    """(step, (state, data_state)) of the newest checkpoint that restores, or (None, None) when there is none.

    A newer checkpoint that fails to restore (truncated or corrupt files) is moved aside as
    `STEP.corrupt` with a warning, and the one before it is tried; when every checkpoint fails,
    the run is refused rather than silently started again from step 0.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        return step, self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001  (orbax raises many kinds for damaged files)
        detail = " ".join(str(e).split())[:300]
        failures.append(f"step {step}: {type(e).__name__}: {detail}")
        older = [s for s in steps if s < step]
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); %s", step, self.directory,
                    type(e).__name__, detail,
                    f"falling back to step {older[0]}" if older else "no older checkpoint is left")
        self._set_aside(step)
    if failures:
      raise CheckpointError(f"{self.directory}: no checkpoint could be restored ({'; '.join(failures)}); the "
                            "damaged ones were renamed *.corrupt. Use a new --workdir, or remove "
                            f"{self.directory} to start again from step 0")
    return None, None

  def _set_aside(self, step: int):
    """Renames a damaged step directory so that neither a restore nor a later save of that step meets it."""
    self.manager.wait_until_finished()
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.corrupt"
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt{n}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxdpo_set_aside_{step}")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
