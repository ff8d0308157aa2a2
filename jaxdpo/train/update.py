"""The jitted steps shared by every training job (DPO, SFT): exact accumulation, update, eval.

An *objective* (`jaxdpo.objectives.dpo_step.objective`, `sft_step.objective`) is
`bind(ref, batch) -> (terms, finish)`: `terms(params, micro_batch) -> (loss share, metric sums)`
with shares normalised by the whole batch's counts, and `finish(loss, sums) -> metrics`. The
steps here sum the terms over `grad_accum` micro-batches, so the result is that of one large
batch whatever the split, and add the optimizer update.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdpo.models import trainable as trainable_lib
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import accumulate as accumulate_lib


def batch_shardings(mesh):
  """One sharding for every batch leaf: the leading axis over the batch mesh axes.

  A PartitionSpec shorter than an array's rank leaves the trailing dims replicated.
  """
  return shd.NamedSharding(mesh, shd.P(shd.batch_sharding(mesh, 1).spec[0]))


def make_update_step(grad_fn: Callable, tx: optax.GradientTransformation, mesh, state_shardings, ref_shardings,
                     schedule: Callable | None = None, *, debug_nonfinite_step: int = -1, trainable_mask=None):
  """Returns jitted `step(state, ref, batch) -> (state, metrics)` with the state donated.

  Args:
    grad_fn: (trainable params, frozen params or None, ref, batch) -> (metrics dict, grads of the
      trainable params), traced inside the jit.
    tx: the optax transformation.
    mesh: the device mesh.
    state_shardings: shardings of {"step", "params", "opt_state"}.
    ref_shardings: shardings of the reference params (or None).
    schedule: learning-rate schedule, logged as `lr`.
    debug_nonfinite_step: tests only: the loss and gradients of this step (1-based) are made NaN.
    trainable_mask: bool tree like the params (`jaxdpo.models.trainable.mask_of`), or None to
      train everything. The optimizer state covers the trainable part only; frozen params
      pass through the step unchanged.

  A step whose loss or gradient norm is not finite leaves params and optimizer state as they
  were (its `nonfinite` metric is 1): a NaN never reaches the state, so it can never be
  checkpointed. The loop then stops or skips (`train.on_nonfinite`).
  """
  def step(state, ref, batch):
    trainable, frozen = trainable_lib.split(state["params"], trainable_mask)
    metrics, grads = grad_fn(trainable, frozen, ref, batch)
    if debug_nonfinite_step > 0:
      poison = jnp.where(state["step"] + 1 == debug_nonfinite_step, jnp.nan, 1.0).astype(jnp.float32)
      metrics["loss"] = metrics["loss"] * poison
      grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    params = trainable_lib.merge(optax.apply_updates(trainable, updates), frozen)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    metrics["nonfinite"] = (~finite).astype(jnp.float32)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  jitted = jax.jit(step, in_shardings=(state_shardings, ref_shardings, batch_shardings(mesh)),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
  return with_mesh(jitted, mesh)


def with_mesh(jitted, mesh):
  """Calls (and so traces) `jitted` under `jax.set_mesh(mesh)`, which activation sharding
  constraints (`layers.constrain_batch`) need; `.lower` is forwarded for AOT compilation."""
  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  call.lower = lower
  call.jitted = jitted
  return call


def accumulated(objective: Callable, params, ref, batch: dict, grad_accum: int, *, with_grad: bool, acc_dtypes=None):
  """(metrics, grads or None) of `objective` over the whole batch, in `grad_accum` micro-batches."""
  terms, finish = objective(ref, batch)
  (loss, sums), grads = accumulate_lib.accumulate(terms, params, batch, grad_accum, with_grad=with_grad,
                                                  acc_dtypes=acc_dtypes)
  return finish(loss, sums), grads


def compute_copy(params, dtype):
  """The floating leaves of `params` cast to `dtype` (the others as they are)."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def make_train_step(objective: Callable, tx: optax.GradientTransformation, mesh, state_shardings, ref_shardings,
                    schedule: Callable | None = None, *, grad_accum: int = 1, debug_nonfinite_step: int = -1,
                    trainable_mask=None, grad_dtype=None):
  """Jitted `step(state, ref, batch) -> (state, metrics)` for `objective`; `state` is donated.

  `state` is {"step": int32 [], "params": pure dict, "opt_state": optax state of the trainable
  params}. With `trainable_mask`, the objective is differentiated with respect to the trainable
  params only: the frozen ones enter as constants (`stop_gradient`), so no gradient is computed
  for them.

  With `grad_dtype` (the compute dtype), the objective is differentiated with respect to the
  params cast to it once, so each gradient leaves the backward pass in that dtype and is cast
  back to its parameter's dtype leaf by leaf as the optimizer reads it; micro-batch gradients are
  summed in the parameters' dtype. The objective casts the params to the compute dtype anyway,
  so the gradients are the same values (bit for bit in fp32, where the cast is the identity); what
  changes is that no gradient tree wider than the compute dtype has to exist before the optimizer.
  """
  def grad_fn(trainable, frozen, ref, batch):
    obj = objective
    if frozen is not None:
      frozen = jax.lax.stop_gradient(frozen)

      def obj(ref, batch):
        terms, finish = objective(ref, batch)
        return (lambda t, mb: terms(trainable_lib.merge(t, frozen), mb)), finish
    if grad_dtype is None:
      return accumulated(obj, trainable, ref, batch, grad_accum, with_grad=True)
    metrics, grads = accumulated(obj, compute_copy(trainable, grad_dtype), ref, batch, grad_accum, with_grad=True,
                                 acc_dtypes=jax.tree.map(lambda p: p.dtype, trainable))
    return metrics, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

  return make_update_step(grad_fn, tx, mesh, state_shardings, ref_shardings, schedule,
                          debug_nonfinite_step=debug_nonfinite_step, trainable_mask=trainable_mask)


def make_eval_step(objective: Callable, mesh, param_shardings, ref_shardings, *, grad_accum: int = 1):
  """Jitted `eval_step(params, ref, batch) -> metrics` (no gradients)."""
  def eval_step(params, ref, batch):
    return accumulated(objective, params, ref, batch, grad_accum, with_grad=False)[0]

  return jax.jit(eval_step, in_shardings=(param_shardings, ref_shardings, batch_shardings(mesh)),
                 out_shardings=shd.replicated(mesh))
