"""Step 1 (policy == reference): rewards, margins and accuracy are exactly 0, as TRL reports them."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxdpo.objectives import dpo_step as step_lib
from tests._dpo_helpers import read_metrics, run_main

ZERO_AT_STEP_ONE = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def test_step_one_rewards_are_exactly_zero_through_main(tmp_path):
  """`python -m jaxdpo.main` with configs/tiny_dpo.py and a live reference, logging every step."""
  # No warmup: with a zero first learning rate, step 2 would still have policy == reference.
  r = run_main(tmp_path / "w", "--config.train.num_steps=3", "--config.train.log_every=1",
               "--config.optim.warmup_steps=0")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_metrics(tmp_path / "w")
  by_step = {row["step"]: row for row in rows if "rewards/margins" in row}
  assert sorted(by_step)[:3] == [1, 2, 3], rows
  for key in ZERO_AT_STEP_ONE:
    assert by_step[1][key] == 0.0, (key, by_step[1][key])  # exactly, not approximately
  # Control: once the policy has moved, the same metrics are live (the test could fail).
  assert by_step[2]["rewards/margins"] != 0.0 and by_step[3]["rewards/margins"] != 0.0


def test_params_identical_is_bitwise():
  a = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  assert bool(step_lib.params_identical(a, jax.tree.map(lambda x: x.copy(), a)))
  assert not bool(step_lib.params_identical(a, {"w": a["w"], "b": a["b"].at[1].add(1e-7)}))
  assert not bool(step_lib.params_identical(a, {"w": a["w"], "b": a["b"].astype(jnp.bfloat16)}))
