"""Deviceless H200 compiles (`jaxdpo.parallel.deviceless`, `bench --analyze --target h200`).

Without the CUDA plugin (CI, a laptop) the target is refused with what to install. With it (see the
module docstring; the lead's box has it in a separate venv), a tiny bf16 step compiles for an H200:
its memory plan is the GPU compiler's, and its attention is cuDNN's fused kernel with no [B, T, S]
mask or bias anywhere in the compiled program (issue 16 acceptance 4, on the compiled program).
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from jaxdpo.cli import bench
from jaxdpo.parallel import deviceless



def _have_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


HAVE_PLUGIN = _have_plugin()


def test_unknown_target_is_refused():
  with pytest.raises(KeyError, match="known: \\['h200'\\]"):
    deviceless.devices("a100")


@pytest.mark.skipif(HAVE_PLUGIN, reason="the CUDA plugin is installed here")
def test_without_the_plugin_the_target_says_what_to_install(monkeypatch, capsys):
  monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", raising=False)
  deviceless.devices.cache_clear()
  with pytest.raises(deviceless.DevicelessUnavailable, match="JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1"):
    deviceless.devices("h200")
  monkeypatch.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  deviceless.devices.cache_clear()
  with pytest.raises(deviceless.DevicelessUnavailable, match="jax-cuda12-plugin\\[with-cuda\\]=="):
    deviceless.devices("h200")
  # The bench turns it into an error line and exit code 2, not a traceback.
  assert bench.main(["--workload", "tiny", "--analyze", "--batch", "2", "--target", "h200"]) == 2
  assert "error: " in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax-cuda12-plugin (see jaxdpo.parallel.deviceless)")
def test_tiny_step_compiles_for_an_h200_with_cudnn_attention_and_no_mask(monkeypatch, capsys):
  monkeypatch.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  import jax
  import numpy as np

  from jaxdpo.cli import bench_analyze
  devices = deviceless.devices("h200")
  assert devices[0].device_kind == "NVIDIA H200"
  assert bench.main(["--workload", "tiny", "--analyze", "--batch", "2", "--target", "h200"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["planned_for"].startswith("h200") and "cudnn" in out["planned_for"]
  gb, cpu = out["planned_gb"], out["backend_plan"]
  # Arguments are the same state and batch on both backends (up to each backend's buffer alignment, 0.1%
  # on this tiny model); the programs' temporaries are each compiler's own.
  assert abs(gb["arguments"] / cpu["planned_gb"]["arguments"] - 1) < 0.01
  assert out["planned_peak_gb"] >= gb["params"] + gb["opt_state"] + gb["reference"]
  # The compiled H200 program of a shared-layout bf16 forward: cuDNN's fused attention, no mask.
  from jaxdpo.models import io, registry
  from jaxdpo.objectives import dpo_step as step_lib
  from jaxdpo.objectives import dpo_losses as losses
  from jaxdpo.parallel import sharding as shd
  from flax import nnx
  w = bench.WORKLOADS["tiny"]()
  fam = registry.get_family(w.family)
  mesh = shd.make_mesh({"data": 1}, devices)
  graphdef, abstract = io.build_abstract(fam, w.model, np.dtype("float32"), "cudnn")
  rep = shd.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.bfloat16, sharding=rep),
                        nnx.to_pure_dict(abstract))
  sample = bench.synthetic_batches(w, 2, 1, w.model.vocab_size)[0][0]
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=rep) for k, v in sample.items()}
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), compute_dtype=jax.numpy.bfloat16,
                             completion_window=bench.completion_window(w))
  fwd = jax.jit(lambda p, b: step_lib.pair_logps(graphdef, p, b, scfg)[0])
  hlo = fwd.lower(params, batch).compile().as_text()
  assert "__cudnn$fmha" in hlo
  t = batch["input_ids"].shape[1]
  masks = re.findall(rf"(?:pred|bf16|f32)\[2,(?:\d+,)?{t},{t}\]", hlo)
  assert masks == [], masks  # the dense path would build pred[2,T,T] (and a bias [2,N,T,T]) here
