"""Gradients taken with respect to the compute-dtype copy (`update.make_train_step(grad_dtype=...)`).

The option must be the plain step: the same gradients (bit for bit in fp32, where the cast is the
identity; within 1e-5 of each tensor's max in bf16 compute) and the same metrics, with and without
micro-batches, and the gradients handed to the optimizer in the parameters' dtype. Negative control:
micro-batch gradients summed in bf16 (no fp32 accumulator) miss the plain step's sum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.models import registry
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import accumulate
from jaxdpo.train import loop as train
from jaxdpo.train import update
from tests._dpo_helpers import grad_recorder

TOL = 1e-5


def _batch(vocab, b=4, t=13, seed=0):
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((b, 2, t), np.int32) for k in step_lib.PAIR_KEYS}
  for i in range(b):
    for j in range(2):
      n = t - (i + j) % 3
      batch["input_ids"][i, j, :n] = rng.integers(0, vocab, n)
      batch["segment_ids"][i, j, :n] = 1
      batch["positions"][i, j, :n] = np.arange(n)
      batch["loss_mask"][i, j, 5:n] = 1
  return batch


@pytest.fixture(scope="module")
def setup():
  fam = registry.get_family("qwen2")
  cfg = dataclasses.replace(fam.presets["tiny"](), num_layers=2)
  graphdef, params = nnx.split(fam.build(cfg, nnx.Rngs(0), jnp.float32, "xla"), nnx.Param)
  params = nnx.to_pure_dict(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(1), len(leaves))))
  ref = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape, p.dtype), params, keys)
  return graphdef, params, ref, _batch(cfg.vocab_size)


def _step(setup, compute_dtype, grad_dtype, grad_accum):
  """(metrics, gradient leaves) of one real train step with a gradient recorder as optimizer."""
  graphdef, params, ref, batch = setup
  mesh = shd.make_mesh({"data": 1})
  tx = grad_recorder()
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  ref_c = jax.tree.map(lambda p: p.astype(compute_dtype), ref)
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), compute_dtype=compute_dtype, grad_accum=grad_accum)
  ref_sh = jax.tree.map(lambda x: x.sharding, params)
  step_fn = update.make_train_step(step_lib.objective(graphdef, scfg), tx, mesh, state_sh, ref_sh,
                                   grad_accum=grad_accum, grad_dtype=grad_dtype)
  state = jax.tree.map(lambda x: x.copy(), state)  # the step donates its state
  state, metrics = step_fn(state, ref_c, shd.put_batch(batch, mesh))
  return jax.device_get(metrics), jax.device_get(state["opt_state"])


def _worst(got, want):
  errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                                         / max(float(np.abs(np.asarray(b, np.float64)).max()), 1e-30)), got, want)
  return max(jax.tree.leaves(errs))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fp32_compute_is_the_plain_step_bit_for_bit(setup, grad_accum):
  m0, g0 = _step(setup, jnp.float32, None, grad_accum)
  m1, g1 = _step(setup, jnp.float32, jnp.float32, grad_accum)
  assert float(m0["loss"]) > 0 and abs(float(m0["rewards/margins"])) > 0  # the reference differs
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(g0))
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), g1, g0))
  for k in step_lib.METRIC_KEYS + ("grad_norm",):
    assert float(m1[k]) == float(m0[k]), k


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_bf16_compute_gives_the_plain_step_gradients_in_the_param_dtype(setup, grad_accum):
  m0, g0 = _step(setup, jnp.bfloat16, None, grad_accum)
  m1, g1 = _step(setup, jnp.bfloat16, jnp.bfloat16, grad_accum)
  assert all(g.dtype == np.float32 for g in jax.tree.leaves(g1))  # the optimizer reads param-dtype grads
  assert _worst(g1, g0) <= TOL
  for k in step_lib.METRIC_KEYS + ("grad_norm",):
    assert abs(float(m1[k]) - float(m0[k])) <= TOL * max(abs(float(m0[k])), 1e-30), k


def test_negative_control_bf16_accumulator_misses(setup):
  """Summing 4 micro-batches' bf16 gradients in bf16 (what the fp32 accumulator avoids) is off."""
  graphdef, params, ref, batch = setup
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), compute_dtype=jnp.bfloat16, grad_accum=4)
  terms, _ = step_lib.objective(graphdef, scfg)(jax.tree.map(lambda p: p.astype(jnp.bfloat16), ref),
                                                jax.tree.map(jnp.asarray, batch))
  copy = update.compute_copy(params, jnp.bfloat16)
  dtypes = jax.tree.map(lambda p: p.dtype, params)
  run = jax.jit(lambda acc: accumulate.accumulate(terms, copy, jax.tree.map(jnp.asarray, batch), 4, with_grad=True,
                                                  acc_dtypes=dtypes if acc else None)[1], static_argnums=0)
  assert _worst(run(False), run(True)) > 100 * TOL
