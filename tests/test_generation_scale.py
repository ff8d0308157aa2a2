"""Issue 14 acceptance 1: generation on a data x fsdp mesh, and across 2 processes x 4 devices,
gives the same greedy outputs as the unsharded path and as transformers' `generate`.

The model is a tiny random HF Qwen2 (converted), initialised with peaked logits so that greedy
parity does not hinge on float rounding between near-tied tokens (see `_gen_helpers`). The
reference is today's path: `run_generation` without a mesh, on one device.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from _gen_helpers import tiny_qwen2_pair
from jaxdpo.data import pipeline, tokenize
from jaxdpo.generation import decode, sampling
from jaxdpo.generation import distributed as mesh_generation
from jaxdpo.jobs import common, model_setup
from jaxdpo.jobs import evaluate as eval_job
from jaxdpo.jobs import mine as mine_job
from jaxdpo.models import io
from jaxdpo.parallel import sharding as shd
from tests import _multihost_helpers as mh
from tests._dpo_helpers import ROOT

NEW = 12
COMMON = {"generate.max_new_tokens": NEW, "degeneration.tail_window": NEW, "train.progress": False}


def _config(name: str, ck: str, arg=None, **overrides):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.model.checkpoint = ck
  for key, value in {**COMMON, **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = getattr(node, p)
    setattr(node, leaf, value)
  return c


def _flags(**overrides) -> list[str]:
  return [f"--config.{k}={v}" for k, v in {**COMMON, **overrides}.items()]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  root = tmp_path_factory.mktemp("genscale")
  hf, _ = tiny_qwen2_pair(str(root))
  return hf, str(root / "ck")


@pytest.fixture(scope="module")
def unsharded(ck):
  """Today's path: every record through `run_generation` with no mesh, the model on one device."""
  _, path = ck
  config = _config("tiny_eval", path)
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  items = sampling.load_prompts(config.data.prompts, tok, common.prompt_config(config))
  _, _, graphdef, params = io.load_model(path)
  rows = sampling.run_generation(nnx.merge(graphdef, params), tok, items,
                                 params=sampling.SamplingParams(NEW), batch_size=config.generate.batch_size,
                                 max_prompt_length=config.generate.max_prompt_length, progress=False)
  return tok, items, [r["tokens"] for r in rows]


def _tokens(path) -> list[list[int]]:
  rows = [json.loads(line) for line in open(path)]
  assert [r["index"] for r in rows] == list(range(len(rows)))  # record order, no gap, no duplicate
  return [r["tokens"] for r in rows]


def test_unsharded_reference_matches_hf_and_is_not_degenerate(ck, unsharded):
  """The reference itself equals HF greedy `generate`, and its outputs differ between records."""
  hf, _ = ck
  tok, items, tokens = unsharded
  config = _config("tiny_eval", ck[1])
  pad = tokenize.pad_token_id(tok)
  batch = pipeline.collate_generation([seq for _, seq in items], length=config.generate.max_prompt_length,
                                      pad_id=pad)
  ref = _hf_greedy_within(hf, batch, vocab_limit=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=pad)
  assert [list(map(int, row[:len(t)])) for row, t in zip(ref, tokens)] == tokens
  assert len({tuple(t) for t in tokens}) > len(tokens) // 2  # equality below is not between constant outputs


def _hf_greedy_within(hf, batch, *, vocab_limit: int, eos_token_id: int, pad_token_id: int) -> np.ndarray:
  """transformers' greedy `generate` that, like jaxdpo's `vocab_limit`, never emits ids past the tokenizer."""
  import torch
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                      attention_mask=torch.tensor(batch["segment_ids"]), do_sample=False, max_new_tokens=NEW,
                      pad_token_id=pad_token_id, eos_token_id=eos_token_id, min_new_tokens=0,
                      suppress_tokens=list(range(vocab_limit, hf.config.vocab_size)))
  return out[:, batch["input_ids"].shape[1]:].numpy()


def test_eval_on_a_data_fsdp_mesh_equals_the_unsharded_path(ck, unsharded, tmp_path):
  """eval on data=2 x fsdp=2 (batch 6: padded to 8 rows on the mesh), in 2 chunks."""
  config = _config("tiny_eval", ck[1], **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1,
                                          "generate.batch_size": 6, "generate.chunk_batches": 2})
  bundle, _, mesh = eval_job.load_generation_model(config)
  specs = [s.spec for s in jax.tree.leaves(bundle.param_shardings)]
  assert any("fsdp" in str(s) for s in specs), specs  # parameters really are sharded on fsdp
  assert mesh_generation.padded_batch(6, mesh) == 8
  eval_job.run(config, str(tmp_path))
  assert _tokens(tmp_path / "generations.jsonl") == unsharded[2]
  assert not (tmp_path / "chunks").exists()  # merged into the final file, then dropped


def test_the_batch_is_split_over_the_data_axes(ck, unsharded):
  """Each device decodes its own rows: the outputs come out split over (data, fsdp)."""
  tok, items, _ = unsharded
  config = _config("tiny_eval", ck[1], **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  mesh = shd.make_mesh(config.mesh)
  bundle = model_setup.setup_model(config.model, mesh, shd.DEFAULT_RULES, seed=0)
  model = nnx.merge(bundle.graphdef, bundle.params)
  batch = pipeline.collate_generation([seq for _, seq in items[:8]], length=config.generate.max_prompt_length,
                                      pad_id=tokenize.pad_token_id(tok))
  kw = dict(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tokenize.pad_token_id(tok))
  with jax.set_mesh(mesh):
    split = decode.generate(model, mesh_generation.place_inputs(batch, mesh), **kw)
  assert split.tokens.sharding.spec == P(("data", "fsdp"))
  # Negative control: host inputs (the path before issue 14) leave the rows unsplit.
  whole = decode.generate(model, batch, **kw)
  assert whole.tokens.sharding.spec != P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(whole.tokens))


def test_vlm_eval_on_a_mesh_equals_the_unsharded_path(tmp_path):
  """Qwen2.5-VL with 0, 1 or 2 images per record, eval on data=2 x fsdp=2 against no mesh."""
  import _vision_job_helpers as VH
  path, _ = VH.build_checkpoint("qwen2_5_vl", str(tmp_path), seed=1)
  _, prompts, _ = VH.vision_records(str(tmp_path / "data"), n=6, seed=2)
  over = {"data.tokenizer": os.path.join(path, "tokenizer"), "data.prompts": prompts, "generate.chunk_batches": 1}
  config = _config("tiny_vl", path, "eval", **over, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  eval_job.run(config, str(tmp_path / "eval"))
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  items = sampling.load_prompts(prompts, tok, common.prompt_config(config), vision)
  _, _, graphdef, params = io.load_model(path)
  rows = sampling.run_generation(nnx.merge(graphdef, params), tok, items, params=sampling.SamplingParams(NEW),
                                 batch_size=config.generate.batch_size,
                                 max_prompt_length=config.generate.max_prompt_length, progress=False, vision=vision)
  assert sum(bool(seq.images) for _, seq in items) >= 4
  assert _tokens(tmp_path / "eval" / "generations.jsonl") == [r["tokens"] for r in rows]
  assert len({tuple(r["tokens"]) for r in rows}) > 1


# ---- across hosts: 2 `python -m jaxdpo.main` processes x 4 fake devices (slow: one fixture) ----------------

MESH = {"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1, "generate.chunk_batches": 1}
MINE = {"mine.num_samples": 2, "mine.temperature": 1.0}


@pytest.fixture(scope="module")
def two_hosts(ck, tmp_path_factory):
  root = tmp_path_factory.mktemp("two_hosts")
  out = {}
  for job, extra in (("eval", {}), ("mine", MINE)):
    out[job] = mh.run_processes(root / job, 2, 4, f"--config.model.checkpoint={ck[1]}", *_flags(**MESH, **extra),
                                config=os.path.join(ROOT, "configs", f"tiny_{job}.py"), timeout=900)
    out[f"{job}_dir"] = root / job
  return out


def test_two_processes_eval_equals_the_unsharded_path(two_hosts, unsharded):
  mh.assert_ok(two_hosts["eval"])
  assert "joined the JAX runtime as process 0 of 2" in two_hosts["eval"][0][2]
  assert "degeneration rate" in two_hosts["eval"][0][1] and "degeneration rate" not in two_hosts["eval"][1][1]
  assert _tokens(two_hosts["eval_dir"] / "generations.jsonl") == unsharded[2]


def test_two_processes_mine_equals_one_device(two_hosts, ck, tmp_path):
  """Sampled mining across hosts writes the same samples and byte-identical pairs as one device."""
  mh.assert_ok(two_hosts["mine"])
  one = _config("tiny_mine", ck[1], **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                                       "generate.chunk_batches": 1, **MINE})
  mine_job.run(one, str(tmp_path))
  two = two_hosts["mine_dir"]
  assert _sample_tokens(two / "samples.jsonl") == _sample_tokens(tmp_path / "samples.jsonl")
  assert (two / "pairs.jsonl").read_bytes() == (tmp_path / "pairs.jsonl").read_bytes()
  assert (tmp_path / "pairs.jsonl").read_text().strip()


def _sample_tokens(path):
  return [(r["index"], r["sample"], r["tokens"]) for r in map(json.loads, open(path))]
