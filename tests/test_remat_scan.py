"""Remat policies and the layer scan (issue 17 items 2-3) against the plain unrolled block loop.

Acceptance 1 (remat / scan part): every `train.remat` policy, scanned and unrolled, gives the DPO
loss and the gradient of every parameter of the plain loop (fp32, 1e-5 relative to each tensor's
largest value), for Qwen2 text and Gemma 3 text (two 5-local + 1-global groups and a remainder).
Each family's variants are compiled as one program (one compile per family on the loaded box).
The negative controls break the scan (layers in the wrong order; a local and a global layer run as
one kind) and show the comparison fails. `saved_residuals` shows each policy keeps what it says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.models import decoder, registry, remat
from jaxdpo.models.gemma3.config import FULL, SLIDING, layer_types_from_pattern
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib

TOL = 1e-5


def _qwen2():
  fam = registry.get_family("qwen2")
  return fam, dataclasses.replace(fam.presets["tiny"](), num_layers=3)


def _gemma3():
  fam = registry.get_family("gemma3_text")
  # 14 layers of the 4B pattern: layers 5 and 11 global; the 12 first are two scanned 6-groups,
  # the last two (local) a scan of their own. The window (5) is shorter than the rows.
  return fam, dataclasses.replace(fam.presets["tiny_text"](), num_layers=14, layer_types=layer_types_from_pattern(14, 6))


def _batch(vocab, b=2, t=13, seed=0):
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((b, 2, t), np.int32) for k in step_lib.PAIR_KEYS}
  for i in range(b):
    for j in range(2):
      n = t - (i + j) % 3  # some padding at the end of rows
      batch["input_ids"][i, j, :n] = rng.integers(0, vocab, n)
      batch["segment_ids"][i, j, :n] = 1
      batch["positions"][i, j, :n] = np.arange(n)
      batch["loss_mask"][i, j, 5:n] = 1
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _setup(family_fn):
  fam, cfg = family_fn()
  model = fam.build(cfg, nnx.Rngs(0), jnp.float32, "xla")
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  # A reference that differs from the policy, so the loss and its gradient are not trivial.
  ref = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape, p.dtype), params,
                     _keys_like(params, 1))
  return model, graphdef, params, ref, _batch(cfg.vocab_size)


def _keys_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(seed), len(leaves))))


def _loss_and_grads(graphdef, plans, params, ref, batch):
  """(loss, grads) of the DPO loss for each plan, all traced into one jitted program."""
  def one(plan):
    cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), blocks=plan)
    n_tokens = batch["loss_mask"][:, 0, 1:].astype(jnp.float32).sum()

    def loss(p):
      return step_lib.loss_terms(p, ref, batch, graphdef, cfg, batch["input_ids"].shape[0], n_tokens)[0]
    return jax.value_and_grad(loss)(params)
  return jax.jit(lambda: [one(plan) for plan in plans])()


def _worst(out, base):
  """Largest error over the loss and every gradient leaf, relative to that tensor's largest value."""
  errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                         / max(float(np.abs(np.asarray(b)).max()), 1e-30)), out, base)
  return max(jax.tree.leaves(errs))


# Every policy unrolled and scanned on Qwen2 (3 layers); on Gemma 3 every policy scanned (the
# unrolled remat path is the same code for both families, and 14 unrolled layers per variant
# would cost minutes of compile on the shared box).
PLANS = {
    "qwen2": [decoder.BlockPlan(remat=r, scan=s) for r in remat.POLICIES for s in (False, True)
              if (r, s) != ("none", False)],
    "gemma3": [decoder.BlockPlan(remat=r, scan=True) for r in remat.POLICIES] + [decoder.BlockPlan(remat="full")],
}


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_every_policy_and_the_scan_match_the_plain_loop(family):
  model, graphdef, params, ref, batch = _setup({"qwen2": _qwen2, "gemma3": _gemma3}[family])
  plans = PLANS[family]
  results = _loss_and_grads(graphdef, [decoder.BlockPlan()] + plans, params, ref, batch)
  base = results[0]
  assert float(base[0]) > 0 and all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(base[1])[:3])
  for plan, out in zip(plans, results[1:]):
    assert _worst(out, base) <= TOL, plan


def test_scan_segments_follow_the_layer_kinds():
  fam, cfg = _gemma3()
  model = fam.build(cfg, nnx.Rngs(0), jnp.float32, "xla")
  assert decoder.scan_segments(model.layers) == [(2, 6), (2, 1)]
  # The published 4B layout: five 5-local + 1-global groups, then four local layers.
  kinds = layer_types_from_pattern(34, 6)
  assert [k for k in kinds[:6]] == [SLIDING] * 5 + [FULL]
  fam_q, cfg_q = _qwen2()
  assert decoder.scan_segments(fam_q.build(cfg_q, nnx.Rngs(0), jnp.float32, "xla").layers) == [(3, 1)]


def test_scanned_step_has_one_loop_per_scan_and_none_when_unrolled():
  _, graphdef, params, ref, batch = _setup(_gemma3)
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1))

  def lowered(plan):
    c = dataclasses.replace(cfg, blocks=plan)
    return jax.jit(lambda p: step_lib.pair_logps(graphdef, p, batch, c)[0]).lower(params).as_text()

  assert lowered(decoder.BlockPlan()).count("stablehlo.while") == 0
  assert lowered(decoder.BlockPlan(scan=True)).count("stablehlo.while") == 2  # the 6-groups, the remainder
  assert lowered(decoder.BlockPlan(scan=True, unroll=True)).count("stablehlo.while") == 0


def test_policies_keep_what_they_say():
  """Residuals the backward pass keeps, per policy, on the Qwen2 blocks (tracing only)."""
  _, graphdef, params, ref, batch = _setup(_qwen2)
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1))

  def saved(plan):
    c = dataclasses.replace(cfg, blocks=plan)
    f = lambda p: step_lib.pair_logps(graphdef, p, batch, c)[0].sum()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      jax.ad_checkpoint.print_saved_residuals(f, params)  # one line per residual: "f32[4,13,40] named 'q_proj' ..."
    lines = out.getvalue().splitlines()
    dims = [re.match(r"\w+\[([\d,]*)\]", line).group(1) for line in lines]
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in dims), lines

  sizes = {name: saved(decoder.BlockPlan(remat=name))[0] for name in remat.POLICIES}
  # From everything to nothing: each policy keeps strictly less than the one before it.
  order = ("none", "dots_saveable", "dots_no_batch", "save_attn", "save_qkv_proj", "full")
  assert [sizes[n] for n in order] == sorted(sizes.values(), reverse=True), sizes
  assert len(set(sizes.values())) == len(order), sizes
  # The named policies keep the named values.
  _, why = saved(decoder.BlockPlan(remat="save_qkv_proj"))
  assert any("q_proj" in w for w in why) and not any("attn_context" in w for w in why), why
  _, why = saved(decoder.BlockPlan(remat="save_attn"))
  assert any("attn_context" in w for w in why) and any("o_proj" in w for w in why), why


def test_negative_control_layers_in_the_wrong_order_fail(monkeypatch):
  _, graphdef, params, ref, batch = _setup(_qwen2)
  base = _loss_and_grads(graphdef, [decoder.BlockPlan()], params, ref, batch)[0]
  real_stack = decoder._stack
  monkeypatch.setattr(decoder, "_stack", lambda states: real_stack(states[::-1]))
  broken = _loss_and_grads(graphdef, [decoder.BlockPlan(scan=True)], params, ref, batch)[0]
  assert _worst(broken, base) > 100 * TOL


def test_negative_control_local_and_global_as_one_kind_fail(monkeypatch):
  _, graphdef, params, ref, batch = _setup(_gemma3)
  base = _loss_and_grads(graphdef, [decoder.BlockPlan()], params, ref, batch)[0]
  # One 14-long scan: every layer then runs as layer 0 (local: window 5, local rope).
  monkeypatch.setattr(decoder, "scan_segments", lambda blocks: [(len(blocks), 1)])
  broken = _loss_and_grads(graphdef, [decoder.BlockPlan(scan=True)], params, ref, batch)[0]
  assert _worst(broken, base) > 100 * TOL


def test_unknown_policy_is_refused_naming_the_choices():
  with pytest.raises(ValueError, match=r"unknown remat policy 'dots'.*save_qkv_proj"):
    decoder.BlockPlan(remat="dots")
