"""Shared helpers for the foundation tests: tiny HF Qwen2 models and configs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from jaxdpo import assets
from jaxdpo.jobs import defaults as config_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_qwen2_hf(tmp_path, *, tied: bool, vocab: int = 96, seed: int = 0):
  """A tiny random `Qwen2ForCausalLM` with odd sizes, saved and converted; returns (hf_model, ckpt_dir)."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  from jaxdpo.models import io
  torch.manual_seed(seed)
  cfg = Qwen2Config(vocab_size=vocab, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                    num_key_value_heads=1, intermediate_size=72, head_dim=8, rope_theta=10000.0,
                    tie_word_embeddings=tied, max_position_embeddings=256, attn_implementation="eager")
  hf = Qwen2ForCausalLM(cfg).eval()
  # Non-trivial norm weights so that a wrong norm convention cannot pass.
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  hf_dir = os.path.join(tmp_path, f"hf-{seed}-{tied}")
  hf.save_pretrained(hf_dir)
  ckpt = os.path.join(tmp_path, f"ckpt-{seed}-{tied}")
  io.hf_to_jax_dir(hf_dir, ckpt)
  return hf, ckpt


def demo_config(**overrides):
  """The tiny DPO config with overrides given as dotted keys ("train.num_steps": 4)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_dpo", os.path.join(ROOT, "configs", "tiny_dpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.progress = False
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = getattr(node, p)
    setattr(node, parts[-1], value)
  return c


def run_main(workdir, *args, env_extra=None, timeout=600):
  """Runs `python -m jaxdpo.main --config configs/tiny_dpo.py --workdir DIR ARGS` in a subprocess."""
  env = dict(os.environ)
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", "tiny_dpo.py"),
         "--workdir", str(workdir), "--config.train.progress=False", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def tokenizer():
  from jaxdpo.data.tokenize import load_tokenizer
  return load_tokenizer(assets.path("tiny_tokenizer"))


def max_rel_err(a, b, mask=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[mask], b[mask]
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def grad_recorder():
  """An optax transformation whose update is zero and whose state is the step's raw gradient.

  Passed to the real train step in place of AdamW, it exposes the gradient the step computed
  (before clipping or any scale-invariant transformation) without changing the step's code.
  """
  import jax
  import jax.numpy as jnp
  import optax
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return optax.GradientTransformation(init=zeros, update=lambda grads, state, params=None: (zeros(grads), grads))


def assert_grads_close(ours: dict, theirs: dict, rel: float, what: str = ""):
  """Per tensor: max|ours - theirs| / max|theirs| <= rel, and no tensor's gradient is all zero."""
  assert sorted(ours) == sorted(theirs), what
  worst = {}
  for key in theirs:
    scale = float(np.abs(np.asarray(theirs[key], np.float64)).max())
    assert scale > 0, f"{what}{key}: zero gradient, the comparison would be vacuous"
    worst[key] = max_rel_err(ours[key], theirs[key])
  bad = {k: v for k, v in worst.items() if v > rel}
  assert not bad, f"{what}per-tensor relative gradient errors above {rel}: {bad}"
  return max(worst.values())
