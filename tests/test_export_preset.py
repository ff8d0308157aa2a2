"""A model trained from a preset exports to HF, and what the CLIs write respects the umask."""

import os
import stat
import subprocess
import sys

import numpy as np
from flax import nnx

from jaxdpo.models import io
from tests._dpo_helpers import ROOT, max_rel_err, run_main


def _modes(top):
  """{relative path: permission bits} of every directory and file under `top` (itself included)."""
  out = {".": stat.S_IMODE(os.stat(top).st_mode)}
  for root, dirs, files in os.walk(top):
    for name in dirs + files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, top)] = stat.S_IMODE(os.stat(path).st_mode)
  return out


def _wrong_modes(top):
  """Entries whose mode is not what umask 022 gives (0755 directories, 0644 files)."""
  wrong = {}
  for rel, mode in _modes(top).items():
    want = 0o755 if os.path.isdir(os.path.join(top, rel)) else 0o644
    if mode != want:
      wrong[rel] = oct(mode)
  return wrong


def test_preset_model_trains_exports_and_loads_in_transformers(tmp_path):
  import torch
  import transformers
  old = os.umask(0o022)  # the children inherit it
  try:
    work = tmp_path / "run"
    out = run_main(work, "--config.train.num_steps=2", "--config.train.log_every=1", "--config.mesh.data=1")
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = work / "model"
    assert "jax-to-hf --ckpt" in out.stdout  # the summary prints the export command, not "not available"
    hf_dir = tmp_path / "hf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    conv = subprocess.run([sys.executable, "-m", "jaxdpo.convert", "jax-to-hf", "--ckpt", str(model_dir),
                           "--out", str(hf_dir)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
  finally:
    os.umask(old)
  # Outputs follow the umask: no 0700 / 0600 from temporary-directory helpers.
  assert _wrong_modes(hf_dir) == {}
  assert _wrong_modes(model_dir) == {}
  assert _wrong_modes(work / "checkpoints") == {}

  hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
  _, cfg, graphdef, params = io.load_model(str(model_dir))
  model = nnx.merge(graphdef, params)
  rng = np.random.RandomState(0)
  b, t = 2, 11
  ids = rng.randint(0, cfg.vocab_size, (b, t))
  seg = (np.arange(t)[None] < np.array([11, 6])[:, None]).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(seg)).logits.numpy()
  h = model.hidden_states({"input_ids": ids, "positions": np.broadcast_to(np.arange(t), (b, t)), "segment_ids": seg})
  ours = np.asarray(model.logits(h))
  assert ours.shape == ref.shape
  assert max_rel_err(ours, ref, seg.astype(bool)) < 1e-5
