"""Conversion streams one shard at a time: peak host memory follows the largest shard, not the model.

Two Qwen2 checkpoints with the same tensor shapes: four safetensors shards of ~100 MB (24 layers) and
one shard a quarter of its size (6 layers). Each direction runs as `python -m jaxdpo.convert` in a
subprocess; its peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a driver process that only runs
it) for the four-shard model may exceed the one-shard model's by less than one shard (issue 11
acceptance 6). A control shows that the measurement sees a process holding a whole model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, MLP, VOCAB = 512, 2048, 1024
LAYERS_PER_SHARD = 6
DRIVER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
          "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def _layer(i, rng):
  p = f"model.layers.{i}."
  shapes = {"self_attn.q_proj.weight": (WIDTH, WIDTH), "self_attn.q_proj.bias": (WIDTH,),
            "self_attn.k_proj.weight": (WIDTH, WIDTH), "self_attn.k_proj.bias": (WIDTH,),
            "self_attn.v_proj.weight": (WIDTH, WIDTH), "self_attn.v_proj.bias": (WIDTH,),
            "self_attn.o_proj.weight": (WIDTH, WIDTH), "mlp.gate_proj.weight": (MLP, WIDTH),
            "mlp.up_proj.weight": (MLP, WIDTH), "mlp.down_proj.weight": (WIDTH, MLP),
            "input_layernorm.weight": (WIDTH,), "post_attention_layernorm.weight": (WIDTH,)}
  return {p + k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def write_qwen2(hf_dir: str, shards: int, seed: int = 0) -> list[int]:
  """A random Qwen2 checkpoint of `shards` shards, six layers each (embedding in the first, final norm
  and LM head in the last). Returns the shard sizes in bytes."""
  from safetensors.numpy import save_file
  from transformers import Qwen2Config
  os.makedirs(hf_dir)
  cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_attention_heads=8,
                    num_key_value_heads=8, head_dim=WIDTH // 8, num_hidden_layers=shards * LAYERS_PER_SHARD,
                    tie_word_embeddings=False)
  cfg.architectures = ["Qwen2ForCausalLM"]
  cfg.save_pretrained(hf_dir)
  rng = np.random.default_rng(seed)
  weight_map, sizes = {}, []
  for s in range(shards):
    tensors = {}
    if s == 0:
      tensors["model.embed_tokens.weight"] = rng.standard_normal((VOCAB, WIDTH), dtype=np.float32)
    for i in range(s * LAYERS_PER_SHARD, (s + 1) * LAYERS_PER_SHARD):
      tensors.update(_layer(i, rng))
    if s == shards - 1:
      tensors["model.norm.weight"] = rng.standard_normal((WIDTH,), dtype=np.float32)
      tensors["lm_head.weight"] = rng.standard_normal((VOCAB, WIDTH), dtype=np.float32)
    name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    save_file(tensors, os.path.join(hf_dir, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    sizes.append(sum(v.nbytes for v in tensors.values()))
    del tensors
  if shards > 1:
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
  return sizes


def peak_rss(*cmd: str) -> int:
  """Peak RSS in bytes of `python CMD...` run in a fresh subprocess (fails on a non-zero exit)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", DRIVER, sys.executable, *cmd], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  line = [x for x in out.stdout.splitlines() if x.startswith("peak_rss_kib ")][-1]
  return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("stream")
  big, small = str(root / "hf4"), str(root / "hf1")
  sizes4, sizes1 = write_qwen2(big, 4), write_qwen2(small, 1, seed=1)
  return root, big, small, sizes4, sizes1


def test_checkpoints_are_as_intended(checkpoints):
  _, _, _, sizes4, sizes1 = checkpoints
  assert len(sizes4) == 4 and len(sizes1) == 1
  assert 90e6 < min(sizes4) and max(sizes4) < 120e6  # a few hundred MB in four shards of ~100 MB
  assert 0.2 < sizes1[0] / sum(sizes4) < 0.3  # a quarter of the size


def test_peak_rss_is_bounded_by_one_shard_both_directions(checkpoints):
  root, big, small, sizes4, sizes1 = checkpoints
  shard = max(sizes4)
  rss = {}
  for name, hf in (("4", big), ("1", small)):
    rss["hf-to-jax", name] = peak_rss("-m", "jaxdpo.convert", "hf-to-jax", "--hf-dir", hf,
                                      "--out", str(root / f"ck{name}"), "--no-tokenizer")
    rss["jax-to-hf", name] = peak_rss("-m", "jaxdpo.convert", "jax-to-hf", "--ckpt", str(root / f"ck{name}"),
                                      "--out", str(root / f"back{name}"),
                                      "--max-shard-gb", str(1.1 * shard / (1 << 30)))
  for direction in ("hf-to-jax", "jax-to-hf"):
    grew = rss[direction, "4"] - rss[direction, "1"]
    print(f"{direction}: peak RSS four shards {rss[direction, '4'] / 1e6:.0f} MB, one shard "
          f"{rss[direction, '1'] / 1e6:.0f} MB, difference {grew / 1e6:.0f} MB (one shard {shard / 1e6:.0f} MB)")
    assert grew < shard, direction
  # Streamed in parts and shards, and back to the same tensors.
  with open(root / "ck4" / "params" / "parts.json") as f:
    assert len(json.load(f)["parts"]) == 4
  with open(os.path.join(root, "back4", "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) == 4
  from jaxdpo.models.convert_table import iter_hf_tensors
  src = dict(iter_hf_tensors(small))
  back = dict(iter_hf_tensors(str(root / "back1")))
  assert sorted(back) == sorted(src)
  for k, v in src.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_measurement_sees_a_whole_model(checkpoints):
  """Control: a process that holds every tensor of the four-shard checkpoint peaks more than three
  shards above one holding the one-shard checkpoint, so the bound above can fail."""
  _, big, small, sizes4, _ = checkpoints
  hold = ("import sys; from jaxdpo.models.convert_table import iter_hf_tensors; "
          "held = dict(iter_hf_tensors(sys.argv[1]))")
  grew = peak_rss("-c", hold, big) - peak_rss("-c", hold, small)
  print(f"holding the whole model: {grew / 1e6:.0f} MB more for four shards")
  assert grew > 2.5 * max(sizes4)


def test_parts_restore_into_shardings(tmp_path):
  """A checkpoint cut into many parts (`max_part_bytes` below one layer) restores straight into
  shardings over an 8-device mesh, equal to the HF tensors; and jax-to-hf gives them back."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from flax import nnx

  from jaxdpo.models import io
  from jaxdpo.models.convert_table import iter_hf_tensors
  from tests._dpo_helpers import tiny_qwen2_hf
  _, ckpt = tiny_qwen2_hf(str(tmp_path), tied=False)
  hf_dir = os.path.join(str(tmp_path), "hf-0-False")
  io.hf_to_jax_dir(hf_dir, str(tmp_path / "parts"), max_part_bytes=20_000)
  with open(tmp_path / "parts" / "params" / "parts.json") as f:
    assert len(json.load(f)["parts"]) > 4
  family, cfg = io.read_model_meta(str(tmp_path / "parts"))
  _, abstract = io.build_abstract(family, cfg)
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  shard = lambda a: NamedSharding(mesh, P("x") if a.shape and a.shape[0] % 8 == 0 else P())
  shardings = jax.tree.map(shard, nnx.to_pure_dict(abstract))
  got = io.flatten(nnx.to_pure_dict(io.load_params(str(tmp_path / "parts"), abstract, shardings=shardings)))
  want = io.flatten(nnx.to_pure_dict(io.load_model(ckpt)[3]))  # the one-part conversion of the same model
  assert sorted(got) == sorted(want)
  for k, v in got.items():
    assert v.sharding == io.flatten(shardings)[k], k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k]), err_msg=k)
  assert any(v.sharding.spec == P("x") for v in got.values())
  io.jax_to_hf_dir(str(tmp_path / "parts"), str(tmp_path / "back"), max_shard_bytes=50_000)
  src, back = dict(iter_hf_tensors(hf_dir)), dict(iter_hf_tensors(str(tmp_path / "back")))
  assert sorted(back) == sorted(src)
  for k, v in src.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
