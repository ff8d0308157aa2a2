"""The DPO job with the train state stacked (`train.stacked_params`), checkpoints kept per layer.

A scanned run holds its params and AdamW state stacked (`jaxdpo.train.stacked_state`); its checkpoints
must have exactly the per-layer layout of a run with `train.stacked_params=off` (same tree, shapes and
dtypes), resuming through a stacked run must give bit-identical params, optimizer state and metrics,
and the stacked run's metrics must be the per-layer run's (fp32, 1e-5). "on" where it cannot apply is
refused naming the key.
"""

import os

import jax
import numpy as np
import pytest

from jaxdpo.errors import ConfigError
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import validate
from jaxdpo.models import decoder
from jaxdpo.train import stacked_state
from tests._dpo_helpers import demo_config, read_metrics, run_main
from tests._multihost_helpers import final_state

N = 4
COMMON = [f"--config.train.num_steps={N}", "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.batch_size=4", "--config.mesh.data=1", "--config.optim.warmup_steps=1",
          "--config.train.scan_layers=True"]


def _ok(r):
  assert r.returncode == 0, r.stderr[-3000:]


def test_stacked_run_resumes_bit_identically_and_checkpoints_per_layer(tmp_path):
  full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
  r = run_main(full, *COMMON)  # stacked_params=auto: stacked, since the layers are scanned
  _ok(r)
  assert "scanned layers stacked (train.stacked_params)" in r.stderr
  _ok(run_main(split, *COMMON, f"--config.train.stop_at_step={N // 2}"))
  r = run_main(split, *COMMON)
  _ok(r)
  assert "resumed from" in r.stderr and "scanned layers stacked" in r.stderr
  r = run_main(plain, *COMMON, "--config.train.stacked_params=off")
  _ok(r)
  assert "scanned layers stacked" not in r.stderr

  a, b, c = final_state(full, N), final_state(split, N), final_state(plain, N)
  # On disk: the per-layer layout, whatever the layout in memory.
  assert jax.tree.structure(a) == jax.tree.structure(c)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(a)] == [(x.shape, x.dtype) for x in jax.tree.leaves(c)]
  assert "layers" in a["params"] and len(a["params"]["layers"]) >= 2
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # resume through a stacked run: bit for bit
    np.testing.assert_array_equal(x, y)
  ma, mb, mc = read_metrics(full), read_metrics(split), read_metrics(plain)
  assert [m["step"] for m in mb] == list(range(1, N + 1))
  assert ma[N // 2:] == mb[N // 2:]
  assert ma[-1]["loss"] != ma[N // 2]["loss"]  # training moved between the halves
  for x, y in zip(ma, mc):  # stacked vs per-layer state: the same steps (fp32)
    for key in ("loss", "grad_norm"):
      assert abs(x[key] - y[key]) <= 1e-5 * abs(y[key]), (key, x[key], y[key])
  # The exported model is per layer too (what jax-to-hf reads).
  assert os.path.isdir(full / "model")


def test_stack_state_round_trips_and_holds_fewer_leaves():
  import jax.numpy as jnp
  from flax import nnx
  from jaxdpo.models import registry
  from jaxdpo.parallel import sharding as shd
  from jaxdpo.train import loop as train
  from tests.test_stacked_state import _tx
  fam = registry.get_family("qwen2")
  graphdef, params = nnx.split(fam.build(fam.presets["tiny"](), nnx.Rngs(0), jnp.float32, "xla"), nnx.Param)
  params = nnx.to_pure_dict(params)
  mesh = shd.make_mesh({"data": 1})
  tx = _tx()
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  want = jax.tree.map(np.asarray, state)
  stacked, disk = stacked_state.stack_state(graphdef, state)
  assert isinstance(stacked["params"], decoder.StackedParams)
  moments = [n for n in jax.tree.leaves(stacked["opt_state"], is_leaf=lambda n: isinstance(n, decoder.StackedParams))
             if isinstance(n, decoder.StackedParams)]
  assert len(moments) == 2  # AdamW's mu and nu, stacked like the params
  assert len(jax.tree.leaves(stacked)) < len(jax.tree.leaves(want))
  back = disk.to_disk(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)


def test_stacked_params_on_is_refused_where_it_cannot_apply(tmp_path):
  with pytest.raises(ConfigError, match=r"config\.train\.stacked_params='on' needs config\.train\.scan_layers"):
    validate.check(demo_config(**{"train.stacked_params": "on"}))
  with pytest.raises(ConfigError, match=r"config\.train\.stacked_params='maybe'"):
    validate.check(demo_config(**{"train.stacked_params": "maybe"}))
  config = demo_config(**{"train.stacked_params": "on", "train.scan_layers": True, "lora.rank": 4,
                          "train.num_steps": 1})
  with pytest.raises(ConfigError, match=r"stacked_params='on' is not built with LoRA"):
    dpo_job.run(config, str(tmp_path))
