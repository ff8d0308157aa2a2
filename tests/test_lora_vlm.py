"""LoRA DPO on the VLMs (issue 13, acceptance 5 without resume): `python -m jaxdpo.main` on tiny
Qwen2.5-VL and Gemma 3 checkpoints with image records, `lora.rank=4`, `model.trainable=language`: the loss
falls and the exported (merged) model's vision tower and projector are bit-identical to the base's."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import _vision_job_helpers as VH
from jaxdpo.models import io
from jaxdpo.models import trainable as trainable_lib
from tests._dpo_helpers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
  return {trainable_lib.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_lora_dpo_on_a_vlm_keeps_the_vision_side(tmp_path, family):
  ck, _ = VH.build_checkpoint(family, str(tmp_path), seed=1)
  _, _, prefs = VH.vision_records(str(tmp_path / "data"), n=4, seed=0)
  work = tmp_path / "dpo"
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", "tiny_vl.py:dpo"),
         "--workdir", str(work), "--config.train.progress=False", "--config.mesh.data=1",
         f"--config.model.checkpoint={ck}", f"--config.data.tokenizer={ck}/tokenizer", f"--config.data.train={prefs}",
         "--config.lora.rank=4", "--config.model.trainable=language", "--config.optim.lr=1e-2",
         "--config.optim.warmup_steps=0", "--config.train.log_every=1", "--config.train.num_steps=4"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  logged = [m for m in read_metrics(str(work)) if "loss" in m]
  assert logged[0]["rewards/margins"] == 0.0 and logged[-1]["loss"] < logged[0]["loss"] - 1e-3
  fam, _, _, base = io.load_model(ck)
  _, _, _, out = io.load_model(str(work / "model"))
  base, out = _flat(nnx.to_pure_dict(base)), _flat(nnx.to_pure_dict(out))
  assert base.keys() == out.keys()
  vision = [p for p in base if any(p == v or p.startswith(v + "/") for v in fam.vision_params)]
  assert vision
  for p in vision:
    np.testing.assert_array_equal(out[p], base[p], err_msg=p)
  moved = [p for p in base if p.endswith("self_attn/q/kernel") and p.startswith("language_model/")]
  assert moved and all(np.abs(out[p] - base[p]).max() > 0 for p in moved)
  # The job writes the PEFT adapter for VLMs too, under transformers' runtime module names
  # (tests/test_lora_peft_vlm.py loads such an adapter with peft).
  with open(work / "peft" / "adapter_config.json") as f:
    targets = json.load(f)["target_modules"]
  assert targets.count("language_model") == 7 * len(moved)
