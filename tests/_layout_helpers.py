"""Helpers of the layout exactness tests (prefix sharing, packing): one real train step with a
gradient recorder in place of the optimizer, and the comparison of metrics and gradients."""

from __future__ import annotations

import jax
import numpy as np

from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import update
from tests._dpo_helpers import grad_recorder

ONE = {"data": 1, "fsdp": 1, "tensor": 1}
MESH = {"data": 2, "fsdp": 2, "tensor": 1}
METRICS = step_lib.METRIC_KEYS
MAX_LENGTH = 64


def model_bundle(data, mesh_sizes, seed):
  """(mesh, ModelBundle) of the data's model on a mesh, set up once per (mesh, seed)."""
  key = (tuple(sorted(mesh_sizes.items())), seed)
  if key not in data["bundles"]:
    mesh = shd.make_mesh(mesh_sizes)
    data["bundles"][key] = mesh, model_setup.setup_model(data["config"].model, mesh, shd.DEFAULT_RULES, seed=seed)
  return data["bundles"][key]


def step_grads(data, batch, mesh_sizes=ONE, grad_accum=1):
  """(metrics, gradient as {path: array}) of one real train step on `batch`; the live reference
  is the model of seed 1 (so rewards and margins are not 0)."""
  config = data["config"]
  config.train.grad_accum = grad_accum
  mesh, bundle = model_bundle(data, mesh_sizes, seed=0)
  _, ref_bundle = model_bundle(data, mesh_sizes, seed=1)
  tx = grad_recorder()
  copy = jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p), out_shardings=bundle.param_shardings)
  params = copy(bundle.params)
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  scfg = dpo_job.step_config(config, bundle.family)
  step_fn = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh, state_sh,
                                   bundle.param_shardings, lambda step: 0.0, grad_accum=scfg.grad_accum)
  state, metrics = step_fn(state, copy(ref_bundle.params), shd.put_batch(batch, mesh))
  grads = {jax.tree_util.keystr(p): np.asarray(g, np.float64)
           for p, g in jax.tree_util.tree_flatten_with_path(jax.device_get(state["opt_state"]))[0]}
  return {k: float(metrics[k]) for k in METRICS}, grads


def metric_scale(k: str, m0: dict, beta: float) -> float:
  """What a metric's error is relative to. Most metrics: their own size. Rewards and margins are
  beta x (policy - reference) log-prob sums, differences of near-equal sums for these tiny models
  (0.03 from sums of 135, whose fp32 rounding alone is ~1e-7 relative), so they are held relative to
  the sums they are computed from: beta x |logps| (1e-5 of that is still 100x fp32's rounding).
  Accuracies are a share of pairs: relative to 1."""
  if k == "rewards/accuracies":
    return 1.0
  sums = {"rewards/chosen": abs(m0["logps/chosen"]), "rewards/rejected": abs(m0["logps/rejected"]),
          "rewards/margins": abs(m0["logps/chosen"]) + abs(m0["logps/rejected"])}
  return max(abs(m0[k]), beta * sums.get(k, 0.0), 1e-30)


def assert_same(got, want, rel=1e-5, beta=0.1):
  (m, g), (m0, g0) = got, want
  for k in METRICS:
    assert abs(m[k] - m0[k]) <= rel * metric_scale(k, m0, beta), (k, m[k], m0[k])
  assert sorted(g) == sorted(g0)
  assert abs(m0["rewards/margins"]) > 0 and abs(m0["loss"] - np.log(2)) > 1e-6  # the reference differs
  largest = max(np.abs(v).max() for v in g0.values())
  assert largest > 0
  for name in g0:
    # An attention key bias shifts every score of a query equally, so softmax ignores it: its
    # true gradient is 0 and both layouts hold rounding noise there (seen: SigLIP's k bias).
    # Such a tensor is measured against 1e-3 of the model's largest gradient instead of its own
    # noise; every other tensor against its own max.
    scale = max(np.abs(g0[name]).max(), 1e-3 * largest)
    err = np.abs(g[name] - g0[name]).max() / scale
    assert err <= rel, f"{name}: gradient differs by {err:.2e} of max(its max, 1e-3 x the model's max)"
