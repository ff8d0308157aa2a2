"""LoRA DPO on the VLMs (issue 13, acceptance 5): `python -m jaxdpo.main` on tiny Qwen2.5-VL and Gemma 3
checkpoints with image records, `lora.rank=4`, `model.trainable=language`: the loss falls, the exported
(merged) model's vision tower and projector are bit-identical to the base's, and a run stopped after 2 steps
and resumed ends bit-identical (params, optimizer state, metrics) to the uninterrupted 4-step run."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

import _vision_job_helpers as VH
from jaxdpo.models import io
from jaxdpo.models import trainable as trainable_lib
from tests._dpo_helpers import read_metrics
from tests._multihost_helpers import final_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4  # steps; 4 records at batch 2, so the resumed half starts a new epoch of the data order


def _dpo(work, ck, prefs, *extra):
  """Runs the LoRA DPO job of this file through `python -m jaxdpo.main`; returns the CompletedProcess."""
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", "tiny_vl.py:dpo"),
         "--workdir", str(work), "--config.train.progress=False", "--config.mesh.data=1",
         f"--config.model.checkpoint={ck}", f"--config.data.tokenizer={ck}/tokenizer", f"--config.data.train={prefs}",
         "--config.lora.rank=4", "--config.model.trainable=language", "--config.optim.lr=1e-2",
         "--config.optim.warmup_steps=0", "--config.train.log_every=1", f"--config.train.num_steps={N}",
         "--config.train.ckpt_every=2", *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def vlm_run(request, tmp_path_factory):
  """The uninterrupted N-step LoRA DPO run of one family, shared by the tests below."""
  root = tmp_path_factory.mktemp(request.param)
  ck, _ = VH.build_checkpoint(request.param, str(root), seed=1)
  _, _, prefs = VH.vision_records(str(root / "data"), n=4, seed=0)
  work = root / "dpo"
  r = _dpo(work, ck, prefs)
  assert r.returncode == 0, r.stderr[-4000:]
  return types.SimpleNamespace(family=request.param, root=root, ck=ck, prefs=prefs, work=work)


def _flat(tree):
  return {trainable_lib.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lora_dpo_on_a_vlm_keeps_the_vision_side(vlm_run):
  family, ck, work, tmp_path = vlm_run.family, vlm_run.ck, vlm_run.work, vlm_run.root
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
  # The job writes the PEFT adapter for VLMs too, under transformers' runtime module names; so does
  # `jax-to-hf --peft` from the run's checkpoint. Loaded with peft onto the HF export of the base, it
  # gives the logits of the merged WORKDIR/model exported with jax-to-hf.
  with open(work / "peft" / "adapter_config.json") as f:
    targets = json.load(f)["target_modules"]
  assert targets.count("language_model") == 7 * len(moved)
  from jaxdpo.cli import convert as convert_cli
  assert convert_cli.main(["jax-to-hf", "--peft", "--ckpt", str(work), "--out", str(tmp_path / "cli-peft")]) == 0
  io.jax_to_hf_dir(ck, str(tmp_path / "base-hf"))
  io.jax_to_hf_dir(str(work / "model"), str(tmp_path / "merged-hf"))
  import torch
  import transformers
  from peft import PeftModel
  cls = getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                               "gemma3": "Gemma3ForConditionalGeneration"}[family])
  load = lambda d: cls.from_pretrained(str(d), attn_implementation="eager").eval()
  peft_model = PeftModel.from_pretrained(load(tmp_path / "base-hf"), str(tmp_path / "cli-peft")).eval()
  ids = torch.tensor(np.random.default_rng(0).integers(1, 200, (2, 11)))
  with torch.no_grad():
    got, want = peft_model(input_ids=ids).logits.numpy(), load(tmp_path / "merged-hf")(input_ids=ids).logits.numpy()
  err = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"{family}: jax-to-hf --peft on the base vs the job's merged model: {err:.2e}")
  assert err < 1e-5


def test_lora_dpo_on_a_vlm_resumes_bit_identically(vlm_run):
  split = vlm_run.root / "split"
  r1 = _dpo(split, vlm_run.ck, vlm_run.prefs, f"--config.train.stop_at_step={N // 2}")
  assert r1.returncode == 0, r1.stderr[-4000:]
  assert [m["step"] for m in read_metrics(split) if "loss" in m] == list(range(1, N // 2 + 1))
  r2 = _dpo(split, vlm_run.ck, vlm_run.prefs)
  assert r2.returncode == 0, r2.stderr[-4000:]
  assert "resumed from" in r2.stderr

  a, b = final_state(vlm_run.work, N), final_state(split, N)
  assert int(a["step"]) == int(b["step"]) == N
  pa, pb = _flat(a["params"]), _flat(b["params"])
  assert pa.keys() == pb.keys() and pa
  for p in pa:
    np.testing.assert_array_equal(pa[p], pb[p], err_msg=p)
  oa, ob = _flat(a["opt_state"]), _flat(b["opt_state"])
  assert oa.keys() == ob.keys() and oa
  for p in oa:
    np.testing.assert_array_equal(oa[p], ob[p], err_msg=p)
  # Adam's moments cover the language-model adapters only (no vision or base leaf has optimizer state).
  adapters = [x for p, x in pa.items() if "lora_" in p]
  assert adapters and not [p for p in pa if "lora_" in p and not p.startswith("language_model/")]
  assert sum(x.size for x in oa.values() if x.size > 1) == 2 * sum(x.size for x in adapters)
  ma, mb = read_metrics(vlm_run.work), read_metrics(split)
  assert [m["step"] for m in mb if "loss" in m] == list(range(1, N + 1))  # no step repeated or missing
  assert ma == mb
  # Training moved the loss across the resume point (otherwise equality would be vacuous).
  logged = [m["loss"] for m in ma if "loss" in m]
  assert logged[-1] != logged[N // 2 - 1]
