"""Issue 13: `python -m jaxdpo.convert jax-to-hf --peft` / `--merge-lora` on a LoRA run of tiny Qwen2.

--ckpt is the run's WORKDIR (newest checkpoint) or WORKDIR/checkpoints/STEP. The PEFT adapter, loaded with
peft onto the HF export of the run's base, gives the logits of the --merge-lora model loaded with
`from_pretrained`, which are the run's own merged WORKDIR/model's. A directory without adapters is refused
with one line naming it, exit 2."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import torch

from jaxdpo.cli import convert as convert_cli
from jaxdpo.cli import main as main_cli
from jaxdpo.jobs import model_setup
from jaxdpo.models import io
from jaxdpo.parallel import sharding as shd
from tests._dpo_helpers import demo_config, max_rel_err


def _logits(model, ids):
  with torch.no_grad():
    return model(input_ids=ids).logits.numpy()


def test_jax_to_hf_peft_and_merge_lora(tmp_path, capsys):
  from peft import PeftModel
  from transformers import AutoModelForCausalLM
  work = tmp_path / "run"
  c = demo_config(**{"lora.rank": 4, "lora.alpha": 8.0, "train.num_steps": 3, "train.log_every": 1,
                     "train.batch_size": 4, "mesh.data": 1, "optim.lr": 1e-2, "optim.warmup_steps": 0, "data.eval": ""})
  main_cli.run(c, str(work))
  assert convert_cli.main(["jax-to-hf", "--peft", "--ckpt", str(work), "--out", str(tmp_path / "peft")]) == 0
  assert convert_cli.main(["jax-to-hf", "--merge-lora", "--ckpt", str(work / "checkpoints" / "3"),
                           "--out", str(tmp_path / "merged-hf")]) == 0
  with open(tmp_path / "peft" / "adapter_config.json") as f:
    assert json.load(f)["r"] == 4

  # The HF export of the run's base (the preset init at the run's seed, as the job built it).
  family, cfg = model_setup.resolve_model(c.model)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  base = model_setup.setup_model(c.model, mesh, shd.DEFAULT_RULES, seed=c.seed).params
  io.export_model_dir(str(tmp_path / "base"), family, cfg, jax.device_get(base), hf_config=family.config_to_hf(cfg))
  io.jax_to_hf_dir(str(tmp_path / "base"), str(tmp_path / "base-hf"))
  io.jax_to_hf_dir(str(work / "model"), str(tmp_path / "job-merged-hf"))  # the job's own merged export

  ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()
  peft_model = PeftModel.from_pretrained(load(tmp_path / "base-hf"), str(tmp_path / "peft")).eval()
  assert sum(1 for n, _ in peft_model.named_parameters() if ".lora_A." in n) == 7 * cfg.num_layers
  got, merged, job = _logits(peft_model, ids), _logits(load(tmp_path / "merged-hf"), ids), \
      _logits(load(tmp_path / "job-merged-hf"), ids)
  with peft_model.disable_adapter():
    plain = _logits(peft_model, ids)
  with capsys.disabled():
      print(f"--peft vs --merge-lora {max_rel_err(got, merged):.2e}; --merge-lora vs WORKDIR/model "
          f"{max_rel_err(merged, job):.2e}; adapters move the logits by {max_rel_err(plain, merged):.2e}")
  assert max_rel_err(got, merged) < 1e-5
  assert max_rel_err(merged, job) < 1e-5
  assert max_rel_err(plain, merged) > 1e-4  # control: 3 steps at lr 1e-2 moved the adapters

  # Refusals: no adapters -> one line naming the directory, exit 2, nothing written.
  capsys.readouterr()
  for bad in (work / "model", tmp_path / "base", tmp_path):
    for flag in ("--peft", "--merge-lora"):
      out = tmp_path / "refused"
      assert convert_cli.main(["jax-to-hf", flag, "--ckpt", str(bad), "--out", str(out)]) == 2
      err = capsys.readouterr().err.strip()
      assert err.count("\n") == 0 and err.startswith("error: ") and str(bad) in err and "no LoRA adapters" in err, err
      assert not out.exists()


def test_readme_usage_and_help_name_the_lora_flags(capsys):
  import re

  import pytest
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    usage = [l for l in f.read().splitlines() if l.startswith("python -m jaxdpo.convert jax-to-hf --")]
  with pytest.raises(SystemExit):
    convert_cli.main(["jax-to-hf", "--help"])
  help_flags = set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
  readme_flags = {f for line in usage for f in re.findall(r"--[a-z-]+", line.split("#")[0])}
  assert {"--peft", "--merge-lora"} <= readme_flags <= help_flags
  assert "--peft" in convert_cli.__doc__ and "--merge-lora" in convert_cli.__doc__
