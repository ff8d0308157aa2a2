"""The policy's train state held stacked (`decoder.StackedParams`: params, gradients, AdamW state).

With the layer scan, a train state whose scanned layers are stored as [L, ...] leaves must be the
per-layer state's step: the same loss and grad_norm after one and two optimizer steps, and the same
params (relative 1e-6 of each tensor's max), fp32, with clipping, weight decay and two micro-batches,
for Qwen2 and Gemma 3 text (two 5-local + 1-global groups stacked, one remainder layer left per
layer). Negative control: a state stacked with two layers swapped is a different model and misses.
The decay mask judges stacked leaves by their per-layer shape (a stacked norm scale is 2-D).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from jaxdpo.models import decoder, registry
from jaxdpo.models.gemma3.config import layer_types_from_pattern
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import optim, update
from tests.test_grad_dtype import _batch

TOL = 1e-6
PLAN = decoder.BlockPlan(remat="full", scan=True)


def _qwen2():
  fam = registry.get_family("qwen2")
  return fam, dataclasses.replace(fam.presets["tiny"](), num_layers=3)


def _gemma3():
  fam = registry.get_family("gemma3_text")
  # 13 layers of the 4B pattern: two 6-groups (layers 5 and 11 global) stacked, layer 12 stays per layer.
  return fam, dataclasses.replace(fam.presets["tiny_text"](), num_layers=13, layer_types=layer_types_from_pattern(13, 6))


def _setup(family_fn):
  fam, cfg = family_fn()
  graphdef, params = nnx.split(fam.build(cfg, nnx.Rngs(0), jnp.float32, "xla"), nnx.Param)
  params = nnx.to_pure_dict(params)
  leaves, treedef = jax.tree.flatten(params)
  noise = lambda seed, scale: jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in
                                                           zip(jax.random.split(jax.random.key(seed), len(leaves)), leaves)])
  # No zero-initialised tensor (biases, Gemma's norm offsets): "relative to the tensor's max" would then compare the
  # Adam updates with each other instead of the parameters.
  params = jax.tree.map(jnp.add, params, noise(2, 0.02))
  ref = jax.tree.map(jnp.add, params, noise(1, 0.05))  # a reference that differs, so the loss is not log 2
  batches = [_batch(cfg.vocab_size, b=2, seed=s) for s in (0, 1)]
  return graphdef, params, ref, batches


def _tx():
  # Clipping well below the gradient norm and non-zero decay, so both act on every step. lr 1e-4 (100x the
  # bench's): Adam normalises each gradient element, so an element that is mostly rounding (a sum that cancels)
  # moves by ~lr whatever its value; the two programs round such sums differently (1.3e-6 of a tensor's max at
  # lr 1e-3 under the tests' fast-compile flags, 1.2e-7 without them), and the loss and grad_norm checks
  # compare the gradients themselves.
  cfg = ConfigDict(dict(lr=1e-4, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=0.1, max_grad_norm=1e-3, mu_dtype=""))
  return optim.make_optimizer(cfg, 4)[0]


def _run(graphdef, params, ref, batches, step_fn=None):
  """(metrics of each step, final params, step_fn) of two optimizer steps from `params`."""
  mesh = shd.make_mesh({"data": 1})
  tx = _tx()
  params = jax.tree.map(jnp.copy, params)  # the state is donated; the callers' arrays stay readable
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  if step_fn is None:
    scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), blocks=PLAN, grad_accum=2)
    step_fn = update.make_train_step(step_lib.objective(graphdef, scfg), tx, mesh,
                                     jax.tree.map(lambda x: x.sharding, state), jax.tree.map(lambda x: x.sharding, ref),
                                     grad_accum=2, grad_dtype=jnp.float32)
  metrics = []
  for b in batches:
    state, m = step_fn(state, ref, b)
    metrics.append({k: float(v) for k, v in m.items()})
  return metrics, state["params"], step_fn


def _stack(graphdef, tree):
  return jax.jit(lambda t: decoder.stack_params(graphdef, t))(tree)


def _worst(got, want):
  errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                         / max(float(np.abs(np.asarray(b)).max()), 1e-30)), got, want)
  return max(jax.tree.leaves(errs))


def _swap_layers(params, i, j):
  out = jax.tree.map(lambda x: x, params)
  out["layers"][i], out["layers"][j] = params["layers"][j], params["layers"][i]
  return out


@pytest.mark.parametrize("family_fn", [_qwen2, _gemma3], ids=["qwen2", "gemma3"])
def test_stacked_state_steps_like_the_per_layer_state(family_fn):
  graphdef, params, ref, batches = _setup(family_fn)
  stacked, stacked_ref = _stack(graphdef, params), _stack(graphdef, ref)
  if family_fn is _gemma3:
    assert stacked.segments == ((0, 2, 6),) and list(stacked.rest["layers"]) == [12]
  per_layer = len(jax.tree.leaves(params["layers"][0]))  # the point: one leaf per stack, not per layer
  fewer = sum((n_groups - 1) * period * per_layer for _, n_groups, period in stacked.segments)
  assert len(jax.tree.leaves(stacked)) == len(jax.tree.leaves(params)) - fewer

  want_m, want_p, _ = _run(graphdef, params, ref, batches)
  got_m, got_p, step_fn = _run(graphdef, stacked, stacked_ref, batches)
  assert isinstance(got_p, decoder.StackedParams) and got_p.segments == stacked.segments
  for want, got in zip(want_m, got_m):
    assert want["nonfinite"] == got["nonfinite"] == 0.0
    assert want["grad_norm"] > 10 * 1e-3  # clipping acts
    for key in ("loss", "grad_norm"):
      assert abs(got[key] - want[key]) <= TOL * abs(want[key]), (key, got[key], want[key])
  moved = _worst(want_p, params)
  assert moved > 100 * TOL  # the steps changed the params
  assert _worst(got_p.full(), want_p) <= TOL

  # Negative control: two layers swapped before stacking (same stacked structure, a different model).
  swapped = _stack(graphdef, _swap_layers(params, 0, 1))
  bad_m, bad_p, _ = _run(graphdef, swapped, stacked_ref, batches, step_fn)
  assert abs(bad_m[0]["loss"] - want_m[0]["loss"]) > 100 * TOL * abs(want_m[0]["loss"])
  assert _worst(bad_p.full(), want_p) > 100 * TOL

  # Step 1 against a reference equal to the policy: rewards exactly 0, through the stacked comparison.
  same_m, _, _ = _run(graphdef, _stack(graphdef, params), _stack(graphdef, params), batches[:1], step_fn)
  assert same_m[0]["rewards/margins"] == 0.0 and same_m[0]["rewards/chosen"] == 0.0


def test_decay_mask_judges_stacked_leaves_by_their_layer_shape():
  graphdef, params, _, _ = _setup(_gemma3)
  stacked = _stack(graphdef, params)
  mask = optim.decay_mask(stacked)
  # The stacked mask is the per-layer mask, stacked (each stack's layers agree).
  def agree(xs):
    assert all(x == xs[0] for x in xs)
    return xs[0]
  assert mask == stacked.like(optim.decay_mask(params), agree)
  norm, kernel = stacked.stacks[0][0]["input_layernorm"]["weight"], stacked.stacks[0][0]["mlp"]["up"]["kernel"]
  assert norm.ndim == 2 and kernel.ndim == 3
  assert mask.stacks[0][0]["input_layernorm"]["weight"] is False  # a [L, D] norm scale: not decayed
  assert mask.stacks[0][0]["self_attn"]["q_norm"]["weight"] is False
  assert mask.stacks[0][0]["mlp"]["up"]["kernel"] is True
  assert mask.rest["layers"][12]["input_layernorm"]["weight"] is False  # the per-layer remainder
  assert mask.rest["layers"][12]["mlp"]["up"]["kernel"] is True


def test_stacked_sharding_adds_an_unsharded_layer_axis():
  mesh = shd.make_mesh({"data": 1})
  s = shd.NamedSharding(mesh, shd.P("fsdp", None))
  assert shd.stacked([s, s]).spec == shd.P(None, "fsdp", None)
  with pytest.raises(ValueError, match="different shardings"):
    shd.stacked([s, shd.NamedSharding(mesh, shd.P(None, "fsdp"))])
