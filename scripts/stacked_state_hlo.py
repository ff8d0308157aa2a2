"""Compiled-HLO census of the DPO train step with the per-layer vs the stacked train state (tiny Qwen2, 3 layers):
leaves, temporaries, fusions and the slice / concatenate ops left after XLA optimisation (BUILD_NOTES "Fast step":
the stacked train state). Run: PYTHONPATH=. python scripts/stacked_state_hlo.py"""
import re, jax, jax.numpy as jnp
from tests import test_stacked_state as t
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train, update
from jaxdpo.objectives import dpo_step as step_lib, dpo_losses as losses
g, params, ref, batches = t._setup(t._qwen2)
mesh = shd.make_mesh({"data": 1})
for stacked in (False, True):
  p, r = (t._stack(g, params), t._stack(g, ref)) if stacked else (params, ref)
  tx = t._tx()
  state = {"step": train.scalar_state(0, mesh), "params": p, "opt_state": train.init_opt_state(tx, p, mesh)}
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), blocks=t.PLAN, compute_dtype=jnp.bfloat16)
  fn = update.make_train_step(step_lib.objective(g, scfg), tx, mesh, jax.tree.map(lambda x: x.sharding, state),
                              jax.tree.map(lambda x: x.sharding, r), grad_dtype=jnp.bfloat16)
  low = fn.lower(state, r, batches[0])
  c = low.compile()
  txt = c.as_text()
  m = c.memory_analysis()
  # computations: split the module into computations; find slices in non-while-body computations
  comps = re.split(r"\n(?=\S.*\{\n)", txt)
  entry = [x for x in comps if x.startswith("ENTRY")][0]
  print("stacked" if stacked else "per-layer", "leaves", len(jax.tree.leaves(p)),
        "temp MiB %.2f" % (m.temp_size_in_bytes / 2**20), "fusions", txt.count(" fusion("),
        "entry slices", len(re.findall(r"= \S+ slice\(", entry)), "entry dyn-slices", entry.count("dynamic-slice("),
        "entry concat", entry.count("concatenate("), "entry broadcast", entry.count(" broadcast("),
        "lines", txt.count("\n"))
  for op in ("slice(", "dynamic-slice(", "dynamic-update-slice(", "pad(", "concatenate(", "scatter("):
    lines = [l.strip() for l in txt.splitlines() if re.search(r"= \S+ " + re.escape(op), l)]
    print("  ", op, len(lines), [l[:110] for l in lines[:3]])
