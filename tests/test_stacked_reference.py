"""The frozen reference stacked once outside the step (`decoder.StackedParams`, `stack_params`).

With the layer scan on, a reference held stacked must give the DPO loss and gradients of the
per-layer reference (fp32, 1e-5 of each tensor's max; the values are the same arrays, so in practice
equal), and the step must no longer stack the reference's layers (one concatenate fewer per stacked
leaf in the lowered program). Negative control: the stacks in the wrong layer order move the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.models import decoder, registry
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from tests.test_grad_dtype import _batch

TOL = 1e-5
PLAN = decoder.BlockPlan(remat="full", scan=True)


@pytest.fixture(scope="module")
def setup():
  fam = registry.get_family("qwen2")
  cfg = dataclasses.replace(fam.presets["tiny"](), num_layers=3)
  graphdef, params = nnx.split(fam.build(cfg, nnx.Rngs(0), jnp.float32, "xla"), nnx.Param)
  params = nnx.to_pure_dict(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(1), len(leaves))))
  ref = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape, p.dtype), params, keys)
  batch = {k: jnp.asarray(v) for k, v in _batch(cfg.vocab_size, b=2).items()}
  return graphdef, params, ref, batch


def _loss_fn(graphdef, batch):
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), blocks=PLAN)
  n_tokens = batch["loss_mask"][:, 0, 1:].astype(jnp.float32).sum()

  def loss(p, ref):
    return step_lib.loss_terms(p, ref, batch, graphdef, cfg, batch["input_ids"].shape[0], n_tokens)[0]
  return loss


def _worst(got, want):
  errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                         / max(float(np.abs(np.asarray(b)).max()), 1e-30)), got, want)
  return max(jax.tree.leaves(errs))


def test_stacked_reference_is_the_per_layer_reference(setup):
  graphdef, params, ref, batch = setup
  stacked = jax.jit(lambda r: decoder.stack_params(graphdef, r))(ref)
  assert stacked.segments == ((0, 3, 1),) and stacked.rest["layers"] == {}
  loss = jax.jit(jax.value_and_grad(_loss_fn(graphdef, batch)))
  base, got = loss(params, ref), loss(params, stacked)
  assert float(base[0]) > 0 and abs(float(base[0]) - np.log(2)) > 1e-6  # the reference differs
  assert _worst(got, base) <= TOL
  # Negative control: the same stacks with the layers reversed are a different reference.
  flipped = dataclasses.replace(stacked, stacks={0: [jax.tree.map(lambda x: x[::-1], stacked.stacks[0][0])]})
  assert abs(float(loss(params, flipped)[0]) - float(base[0])) > 100 * TOL * abs(float(base[0]))


def test_step_does_not_stack_a_stacked_reference(setup):
  graphdef, params, ref, batch = setup
  stacked = jax.jit(lambda r: decoder.stack_params(graphdef, r))(ref)
  loss = _loss_fn(graphdef, batch)
  count = lambda r: jax.jit(jax.grad(loss)).lower(params, r).as_text().count("stablehlo.concatenate")
  per_layer_leaves = len(jax.tree.leaves(stacked.stacks))
  assert per_layer_leaves > 5
  assert count(ref) - count(stacked) == per_layer_leaves
