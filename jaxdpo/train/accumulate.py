"""Gradient accumulation shared by the DPO and SFT steps.

A step's loss is written as a sum of per-micro-batch *shares*, each normalised by global
counts (pairs, tokens) computed over the whole batch. Summing shares over micro-batches then
gives exactly the loss and gradient of one large batch, whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def micro_batches(batch: dict, n: int) -> dict:
  """[R, ...] -> [n, R/n, ...]; row j*n + a goes to micro-batch a.

  The sharded leading axis keeps its layout, so splitting needs no communication.
  """
  return {k: jnp.moveaxis(v.reshape((v.shape[0] // n, n) + v.shape[1:]), 1, 0) for k, v in batch.items()}


def accumulate(terms: Callable, params, batch: dict, n_micro: int, *, with_grad: bool, acc_dtypes=None):
  """Sums `terms(params, micro_batch) -> (loss_share, metric_sums)` over micro-batches.

  Args:
    acc_dtypes: optional tree like `params` of the dtypes the gradient sum is carried in over
      micro-batches (e.g. the parameters' fp32 when `params` is their bf16 compute copy, so that
      the sum of micro-batch gradients is not rounded to bf16 at every micro-batch). None: the
      gradients' own dtype.

  Returns:
    ((loss, metric sums), grads or None).
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  if rows % n_micro:
    raise ValueError(f"batch of {rows} rows is not divisible by grad_accum={n_micro}")
  fn = jax.value_and_grad(terms, has_aux=True) if with_grad else terms

  def body(carry, mb):
    # carry + share, in the carry's dtype (an fp32 sum of bf16 micro-batch gradients stays fp32)
    return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, fn(params, mb)), None

  micro = micro_batches(batch, n_micro)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, params, first))
  if with_grad and acc_dtypes is not None:
    zeros = (zeros[0], jax.tree.map(lambda z, d: jnp.zeros(z.shape, d), zeros[1], acc_dtypes))
  if n_micro == 1:  # no loop in the program: XLA's cost analysis counts a loop body once
    total = fn(params, first)
  else:
    total, _ = jax.lax.scan(body, zeros, micro)
  return total if with_grad else (total, None)
