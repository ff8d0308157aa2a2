"""The training loop shared by the DPO and SFT jobs: init or restore, step, eval, checkpoint, log.

Resuming is automatic: if `workdir/checkpoints` holds a checkpoint, the state and the data
iterator are restored from the latest one and the run continues to `train.num_steps`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdpo import errors
from jaxdpo.train import checkpoint as ckpt_lib
from jaxdpo.train import metrics as metrics_writer
from jaxdpo.parallel import sharding as shd

log = logging.getLogger("jaxdpo")


@dataclasses.dataclass
class LoopSpec:
  """What the generic loop needs from a job."""

  step_fn: Callable          # (state, ref, batch) -> (state, metrics); state donated
  state: dict                # {"step", "params", "opt_state"}
  ref: object                # passed through to step_fn (reference params, or None)
  iterator: Iterator         # grain DatasetIterator of host-local numpy batches
  eval_fn: Callable | None = None  # (params) -> dict of eval metrics, every train.eval_every steps
  degeneration_fn: Callable | None = None  # (params) -> {"eval/degeneration_rate", ...}, every
                                           # train.degeneration_eval_every steps
  desc: str = "train"
  constants: dict = dataclasses.field(default_factory=dict)  # added to every logged metrics row (e.g. the
                                                             # number of skipped bad records)
  outcome: dict = dataclasses.field(default_factory=dict)  # set by run_loop: step, reason, checkpoint
  disk: object = None  # `stacked_state.DiskLayout` when the state is held stacked (checkpoints stay per layer)


class PreemptionGuard:
  """Turns SIGTERM (TPU maintenance, SLURM preemption) and Ctrl-C into a checkpoint at the next step boundary.

  The first SIGINT or SIGTERM only sets a flag: the step in flight finishes, the state is saved,
  and the loop exits. A second Ctrl-C raises KeyboardInterrupt at once (nothing more is saved).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self._old = {}

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if self.requested and signum == signal.SIGINT:
        raise KeyboardInterrupt  # the second Ctrl-C: abort now
      self.requested = True
      self.signal_name = signal.Signals(signum).name
      print(f"{self.signal_name} received: saving a checkpoint at the end of this step, then exiting "
            "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread (e.g. under some test runners)
        pass
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def agreed(self) -> bool:
    """Whether any process was asked to stop; every process gets the same answer.

    On many hosts the signal may reach only some of them (or at different steps). A host that
    stopped alone would leave the others waiting in the step's collectives, so the flags are
    all-gathered at every step boundary (one tiny collective) and the stop step is shared.
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def init_opt_state(tx, params, mesh):
  """Optimizer state created under jit; its parameter-shaped parts (mu, nu) sharded like the parameters.

  The shardings must be given: `zeros_like` outputs do not inherit their input's sharding, and
  without `out_shardings` XLA replicates the whole optimizer state on every device.
  """
  from jaxdpo.parallel import memory
  abstract = jax.eval_shape(tx.init, params)
  shardings = memory.opt_state_shardings(abstract, params, jax.tree.map(lambda x: x.sharding, params), mesh)
  with jax.set_mesh(mesh):
    return jax.jit(tx.init, out_shardings=shardings)(params)


def run_loop(config, workdir: str, mesh, spec: LoopSpec) -> dict:
  """Runs steps until `train.num_steps` (or `train.stop_at_step`, SIGTERM or Ctrl-C). Returns last metrics.

  Sets `spec.state` to the final state and `spec.outcome` to {"step", "reason", "checkpoint"}:
  reason is "finished", "stop_at_step" or the signal's name. Every stop prints one line saying
  what was saved.
  """
  tcfg = config.train
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tcfg.max_to_keep,
                                       save_every=tcfg.ckpt_every)
  state = spec.state
  start = 0
  disk = spec.disk
  latest, restored = checkpointer.restore_latest_complete(disk.abstract if disk else ckpt_lib.abstract_like(state))
  if latest is not None:
    state, data_state = restored
    if disk is not None:
      state = disk.from_disk(state)
    if data_state is not None:
      spec.iterator.set_state(data_state)
    start = int(latest)
    log.info("resumed from %s at step %d", checkpointer.directory, start)
  end = tcfg.num_steps
  if tcfg.stop_at_step >= 0:
    end = min(end, tcfg.stop_at_step)
  writer = metrics_writer.MetricsWriter(workdir, resume_step=start, tensorboard=tcfg.tensorboard)
  show = tcfg.progress and jax.process_index() == 0
  bar = tqdm(total=tcfg.num_steps, initial=start, desc=spec.desc, disable=not show, dynamic_ncols=True)
  run = _Progress(step=start, saved=latest, state=state,
                  skipped=int(writer.last_row.get("nonfinite_skipped", 0)) if start else 0)
  try:
    with PreemptionGuard() as guard:
      _run_steps(config, mesh, spec, run, checkpointer, writer, bar, guard, end, show)
  except KeyboardInterrupt:
    bar.close()
    where = f"step {run.saved} in {checkpointer.directory}" if run.saved is not None else "none"
    _say(f"aborted by a second Ctrl-C during step {run.step + 1}: nothing more was saved; the latest complete "
         f"checkpoint is {where}")
    raise
  bar.close()
  checkpointer.close()
  writer.close()
  spec.state = run.state
  path = os.path.join(checkpointer.directory, str(run.saved)) if run.saved is not None else None
  spec.outcome = {"step": run.step, "reason": run.reason, "checkpoint": path}
  if run.reason == "finished":
    _say(f"finished at step {run.step}: checkpoint saved to {path}")
  elif run.reason == "stop_at_step":
    _say(f"stopped at config.train.stop_at_step={run.step}: checkpoint saved to {path}; "
         "re-run without stop_at_step to continue")
  else:
    # Every host says it, so that each host's log shows where it stopped.
    print(f"stopped by {run.reason} after step {run.step}: checkpoint saved to {path}; "
          "re-run the same command to resume", file=sys.stderr, flush=True)
  return run.last


@dataclasses.dataclass
class _Progress:
  """Where the loop is: the last step run and saved, the state, the last logged metrics, why it stopped."""

  step: int
  saved: int | None
  state: dict
  last: dict = dataclasses.field(default_factory=dict)
  reason: str = "finished"
  skipped: int = 0  # steps whose update was skipped for a non-finite loss or grad norm (whole run)


def _nonfinite(tcfg, run: _Progress, metrics: dict, checkpointer):
  """A step with a NaN/inf loss or grad norm (its update was not applied): stop, or count it and go on."""
  values = {k: float(v) for k, v in jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")}).items()}
  bad = ", ".join(f"{k}={values[k]}" for k in ("loss", "grad_norm") if not np.isfinite(values[k]))
  if tcfg.on_nonfinite == "skip":
    run.skipped += 1
    log.warning("step %d: non-finite %s; update skipped (%d so far, train.on_nonfinite=skip)", run.step, bad,
                run.skipped)
    return
  checkpointer.close()  # saves of earlier steps complete; nothing of this step is saved
  where = (f"the latest checkpoint is step {run.saved} in {checkpointer.directory}" if run.saved is not None
           else "no checkpoint was saved")
  raise errors.NonFiniteError(f"step {run.step}: non-finite {bad}; training stopped and this step was not "
                              f"saved ({where}). Lower optim.lr or check the data; "
                              "--config.train.on_nonfinite=skip skips such steps instead")


def _say(line: str):
  """One line for the user on stderr (process 0 only), next to the progress bar."""
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def _run_steps(config, mesh, spec: LoopSpec, run: _Progress, checkpointer, writer, bar, guard, end: int, show: bool):
  tcfg = config.train
  start = run.step
  durations: list[float] = []
  while run.step < end:
    t0 = time.perf_counter()
    batch = shd.put_batch(next(spec.iterator), mesh)
    run.state, metrics = spec.step_fn(run.state, spec.ref, batch)
    # One scalar per step reaches the host (a sync): a non-finite step must be seen before any save.
    metrics = dict(metrics)
    nonfinite = bool(jax.device_get(metrics.pop("nonfinite", 0.0)))
    run.step += 1
    step = run.step
    if nonfinite:
      _nonfinite(tcfg, run, metrics, checkpointer)
    want_log = step % tcfg.log_every == 0 or step == end or nonfinite
    # Held-out data is always scored at the end of the run; eval_every adds evals on the way.
    want_eval = spec.eval_fn is not None and (step == end or _due(step, end, tcfg.eval_every))
    want_degen = spec.degeneration_fn is not None and _due(step, end, tcfg.degeneration_eval_every)
    if want_log or want_eval or want_degen:
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      last["nonfinite_skipped"] = float(run.skipped)
      last.update(spec.constants)
      if want_eval:
        last.update(spec.eval_fn(run.state["params"]))
      if want_degen:
        last.update(spec.degeneration_fn(run.state["params"]))
      writer.write(step, last)
      run.last = last
      bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "rewards/accuracies") if k in last})
      if not show and jax.process_index() == 0:
        log.info("step %d: %s", step, {k: round(v, 5) for k, v in last.items()})
    if step == tcfg.debug_sigterm_step and jax.process_index() == jax.process_count() - 1:
      os.kill(os.getpid(), signal.SIGTERM)  # test hook: a real SIGTERM, to the last process only
    preempted = guard.agreed()
    if checkpointer.should_save(step) or preempted or step == end:
      saved = spec.disk.to_disk(run.state) if spec.disk is not None else run.state
      checkpointer.save(step, saved, spec.iterator.get_state(), force=True)
      run.saved = step
    if tcfg.straggler_factor > 0 and step > start + 2:  # the first steps include compilation
      _straggler_check(durations, time.perf_counter() - t0, step, tcfg.straggler_factor)
    bar.update(1)
    if preempted:
      run.reason = guard.signal_name or "a signal on another host"
      return
  if end < tcfg.num_steps:
    run.reason = "stop_at_step"


def _due(step: int, end: int, every: int) -> bool:
  return every > 0 and (step % every == 0 or step == end)


def _straggler_check(durations: list[float], seconds: float, step: int, factor: float):
  """Warns (with the host id) about a step slower than `factor` x the median of recent steps."""
  if len(durations) >= 5:
    median = float(np.median(durations[-100:]))
    if seconds > factor * median:
      log.warning("slow step %d on host %d: %.3fs vs median %.3fs", step, jax.process_index(), seconds, median)
  durations.append(seconds)


def init_state(bundle, tx, mesh, trainable_mask=None) -> dict:
  """The train state {"step", "params", "opt_state"} for a freshly set-up model.

  With `trainable_mask` (see `jaxdpo.models.trainable`), the optimizer state covers the
  trainable params only.
  """
  from jaxdpo.models import trainable as trainable_lib
  return {"step": scalar_state(0, mesh), "params": bundle.params,
          "opt_state": init_opt_state(tx, trainable_lib.trainable_part(bundle.params, trainable_mask), mesh)}


def export_final_model(workdir: str, config, bundle, params) -> str:
  """Writes `workdir/model`, a converted-checkpoint dir that the next job loads with
  `--config.model.checkpoint=workdir/model`."""
  from jaxdpo.models import io
  tok_dir = config.data.tokenizer
  hf_config = io.source_hf_config(config.model.checkpoint)
  if hf_config is None and bundle.family.config_to_hf is not None:
    # A preset-initialised model: derive its config.json so that jax-to-hf can export it.
    try:
      hf_config = bundle.family.config_to_hf(bundle.config)
    except errors.ConversionError as e:  # the trained model is still written; only its export is refused
      log.warning("the model cannot be exported to HF: %s", e)
  return io.export_model_dir(os.path.join(workdir, "model"), bundle.family, bundle.config, params,
                             hf_config=hf_config, tokenizer_dir=tok_dir)


def scalar_state(step: int, mesh):
  return jax.device_put(jnp.asarray(step, jnp.int32), shd.replicated(mesh))
