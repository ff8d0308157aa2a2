"""A lean train state (issue 17 item 4): the reference held in the compute dtype, cast once at load;
`optim.mu_dtype` for AdamW's first moment; step 1's exact zeros survive a bf16 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.data.pipeline import collate_pairs
from jaxdpo.data.tokenize import TokenizedPair
from jaxdpo.errors import ConfigError
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup, validate
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import optim, update
from tests._dpo_helpers import demo_config


@pytest.fixture(scope="module")
def bundle():
  config = demo_config(**{"model.compute_dtype": "bfloat16"})
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  return model_setup.setup_model(config.model, mesh, shd.DEFAULT_RULES, seed=0)


def test_reference_is_cast_once_to_the_compute_dtype(bundle):
  ref = dpo_job.reference_copy(bundle, jnp.bfloat16)
  leaves, ref_leaves = jax.tree.leaves(bundle.params), jax.tree.leaves(ref)
  assert {x.dtype for x in leaves} == {jnp.dtype("float32")}
  assert {x.dtype for x in ref_leaves} == {jnp.dtype("bfloat16")}
  for x, r in zip(leaves, ref_leaves):
    np.testing.assert_array_equal(np.asarray(r), np.asarray(x.astype(jnp.bfloat16)))
  # Same dtype: still a copy in separate buffers (the train state is donated).
  same = dpo_job.reference_copy(bundle, jnp.float32)
  for x, r in zip(leaves, jax.tree.leaves(same)):
    assert r.dtype == x.dtype and r.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()


def _batch():
  rng = np.random.default_rng(0)
  ids = lambda n: [int(v) for v in rng.integers(3, 90, n)]
  pairs = [TokenizedPair(f"pair {i}", ids(6), ids(4 + i), ids(7 - i)) for i in range(2)]
  return {k: jnp.asarray(v) for k, v in collate_pairs(pairs, max_length=20, pad_id=0).items()}


def test_step_one_rewards_exactly_zero_with_a_bf16_reference(bundle):
  cfg = dpo_step.StepConfig(loss=losses.DPOLossConfig(beta=0.1), compute_dtype=jnp.bfloat16, logprob_chunk=8)
  ref = dpo_job.reference_copy(bundle, jnp.bfloat16)
  run = jax.jit(lambda p, r, b: update.accumulated(dpo_step.objective(bundle.graphdef, cfg), p, r, b, 1,
                                                   with_grad=False)[0])
  m = run(bundle.params, ref, _batch())
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert float(m[key]) == 0.0, key
  # Control: a reference one bf16 step away on one tensor is not the policy; the rewards are live.
  leaf = jax.tree_util.tree_leaves_with_path(ref)[0][0]
  moved = jax.tree_util.tree_map_with_path(lambda path, x: x * 1.5 if path == leaf else x, ref)
  assert float(run(bundle.params, moved, _batch())["rewards/margins"]) != 0.0


def test_mu_dtype_sets_adamw_first_moment():
  config = demo_config(**{"optim.mu_dtype": "bfloat16"})
  params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.ones((4,), jnp.float32)}
  tx, _ = optim.make_optimizer(config.optim, 10)
  state = tx.init(params)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype("float32")}
  default_tx, _ = optim.make_optimizer(demo_config().optim, 10)
  default = [s for s in jax.tree.leaves(default_tx.init(params), is_leaf=lambda s: hasattr(s, "mu"))
             if hasattr(s, "mu")][0]
  assert {x.dtype for x in jax.tree.leaves(default.mu)} == {jnp.dtype("float32")}


def test_mu_dtype_is_validated_naming_the_key():
  with pytest.raises(ConfigError, match=r"config\.optim\.mu_dtype='float16'"):
    validate.check(demo_config(**{"optim.mu_dtype": "float16"}))
  with pytest.raises(ConfigError, match=r"config\.optim\.mu_dtype='half'"):
    optim.mu_dtype_of("half")
