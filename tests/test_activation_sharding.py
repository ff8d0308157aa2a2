"""On an fsdp mesh each device computes only its rows: activations follow the batch axes.

Checked through XLA's own memory analysis of the compiled train step (bytes, not time): the
per-device temporaries on fsdp=8 must be close to those on data=8 (both hold 1/8 of the
rows), not ~8x larger as when the batch is replicated.
"""

import jax
import numpy as np

from jaxdpo.jobs import model_setup
from jaxdpo.train import optim
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import update
from jaxdpo.data import pipeline
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.models import layers
from tests._dpo_helpers import demo_config, tokenizer


def _temp_bytes(sizes, monkeypatch=None):
  config = demo_config(**{"train.batch_size": 16, "data.max_length": 48})
  mesh = shd.make_mesh(sizes)
  tok = tokenizer()
  examples = dpo_job.tokenize_preferences(config.data.train, tok, config, desc="t")[:16]
  batch = shd.put_batch(pipeline.collate_pairs(examples, max_length=48, pad_id=tok.pad_token_id), mesh)
  bundle = model_setup.setup_model(config.model, mesh, shd.DEFAULT_RULES, seed=0)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  state = train.init_state(bundle, tx, mesh)
  scfg = dpo_job.step_config(config, bundle.family)
  step_fn = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh,
                                   jax.tree.map(lambda x: x.sharding, state), bundle.param_shardings, schedule, grad_accum=scfg.grad_accum)
  compiled = step_fn.lower(state, bundle.params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_fsdp_activations_are_split_over_the_batch(monkeypatch):
  data = _temp_bytes({"data": 8})
  fsdp = _temp_bytes({"fsdp": 8})
  assert fsdp < 2 * data, (fsdp, data)
  # Control: without the constraint the batch is replicated on the fsdp mesh.
  monkeypatch.setattr(layers, "constrain_batch", lambda x: x)
  unconstrained = _temp_bytes({"fsdp": 8})
  assert unconstrained > 2 * fsdp, (unconstrained, fsdp)
