"""The image data path: bad image input is caught before training and named; budgets, truncation,
prompt forms and the Gemma 3 image bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import _vision_job_helpers as VH
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.generation import sampling as sampling_run
from jaxdpo.data import pipeline, records, tokenize
from jaxdpo.jobs import common
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.models.gemma3 import batching as gemma3_batching
from jaxdpo.models.qwen2_5_vl import batching as qwen_batching
from jaxdpo.jobs import sft as sft_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"qwen2_5_vl": "tiny_vl", "gemma3": "tiny"}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def env(request, tmp_path_factory):
  """A preset model config (no weights needed), the family's tiny tokenizer dir and records."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  tok_dir = str(root / "tok")
  (VH.qwen_processor_files if family == "qwen2_5_vl" else VH.gemma_processor_files)(tok_dir)
  paths = VH.vision_records(str(root / "data"), n=6, seed=0)
  return dict(family=family, root=root, tok_dir=tok_dir, sft=paths[0], prompts=paths[1], prefs=paths[2])


def _config(env, **data):
  c = config_defaults.base()
  c.model.family, c.model.preset = env["family"], PRESETS[env["family"]]
  c.data.tokenizer, c.data.max_length, c.train.progress = env["tok_dir"], 64, False
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _vision(config):
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  return tok, common.vision_adapter(config, tok)


def _rewrite(src, dst, line: int, **fields):
  with open(src) as f:
    rows = [json.loads(x) for x in f]
  rows[line - 1].update(fields)
  return VH.write_jsonl(dst, rows)


def test_missing_image_stops_the_cli_before_training(env, tmp_path):
  prefs = _rewrite(env["prefs"], os.path.join(os.path.dirname(env["prefs"]), "prefs_missing.jsonl"), 3,
                   images=["img/page0.png", "img/nope.png"])
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", "tiny_vl.py:dpo"),
         "--workdir", str(tmp_path / "w"), "--config.train.progress=False", "--config.mesh.data=1",
         f"--config.model.family={env['family']}",
         f"--config.model.preset={PRESETS[env['family']]}", f"--config.data.tokenizer={env['tok_dir']}",
         f"--config.data.train={prefs}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2, r.stderr[-3000:]
  want = f"error: {prefs}:3: field 'images': file not found: {os.path.dirname(prefs)}/img/nope.png"
  assert want in r.stderr, r.stderr[-3000:]
  assert not (tmp_path / "w" / "checkpoints").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.parametrize("job", ["sft", "eval"])
def test_missing_and_unreadable_images_name_the_record(env, job):
  config = _config(env)
  tok, vision = _vision(config)
  src = env["sft"] if job == "sft" else env["prompts"]
  load = ((lambda p: sft_job.tokenize_sft(p, tok, config, desc="t", vision=vision)) if job == "sft" else
          (lambda p: sampling_run.load_prompts(p, tok, common.prompt_config(config), vision)))
  assert len(load(src)) == 6
  data_dir = os.path.dirname(src)
  missing = _rewrite(src, os.path.join(data_dir, f"{job}_missing.jsonl"), 2, images=["img/gone.png"])
  with pytest.raises(records.DataError, match=rf"{job}_missing.jsonl:2: field 'images': file not found: .*gone.png"):
    load(missing)
  with open(os.path.join(data_dir, "img", "broken.png"), "wb") as f:
    f.write(b"not a png at all")
  broken = _rewrite(src, os.path.join(data_dir, f"{job}_broken.jsonl"), 5, images=["img/broken.png"])
  with pytest.raises(records.DataError, match=rf"{job}_broken.jsonl:5: field 'images': .*broken.png: cannot read image"):
    load(broken)


def test_text_model_refuses_image_records(env):
  config = config_defaults.base()
  config.train.progress = False
  tok = tokenize.load_tokenizer(config.data.tokenizer)  # the embedded text tokenizer, family qwen2
  assert common.vision_adapter(config, tok) is None
  with pytest.raises(records.DataError, match=r"prefs.jsonl:1: field 'images': the model has no vision tower"):
    dpo_job.tokenize_preferences(env["prefs"], tok, config, desc="t")


def test_budget_is_fixed_and_checked(env):
  config = _config(env)
  tok, vision = _vision(config)
  examples = dpo_job.tokenize_preferences(env["prefs"], tok, config, desc="t", vision=vision)
  auto = vision.with_budget(examples)
  assert auto.budget.max_images == 2
  if env["family"] == "qwen2_5_vl":
    # Record 6 has the most patches: 32x24 (48 patches) + 40x16 (40 patches) with patch 4, merge 2.
    assert [sum(e.image_units) for e in examples] == [48, 64, 0, 40, 16, 88] and auto.budget.max_patches == 88
  batch = pipeline.collate_pairs(examples[:3], max_length=64, pad_id=0, vision=auto)
  assert all(v.shape[0] == 3 for v in batch.values())  # every leaf leads with the pair axis
  with pytest.raises(records.DataError, match=r"prefs.jsonl:2: field 'images': 2 images exceed data.max_images=1"):
    _vision(_config(env, max_images=1))[1].with_budget(examples)
  if env["family"] == "qwen2_5_vl":
    with pytest.raises(records.DataError, match=r"prefs.jsonl:2: field 'images': the images need 64 patches, more "
                                                r"than data.max_patches=60"):
      _vision(_config(env, max_patches=60))[1].with_budget(examples)
  fixed = _vision(_config(env, max_images=3, max_patches=96))[1].with_budget(examples)
  batch = pipeline.collate_pairs(examples[:3], max_length=64, pad_id=0, vision=fixed)
  assert batch["pixel_values"].shape[:2] == ((3, 96) if env["family"] == "qwen2_5_vl" else (3, 3))


def test_truncation_never_cuts_image_tokens(env):
  config = _config(env, max_length=20, truncation="keep_end")
  tok, vision = _vision(config)
  with pytest.raises(records.DataError, match=r"prefs.jsonl:\d: field 'images': truncation cut the prompt's image "
                                              r"tokens \(\d+ of \d+ kept\)"):
    dpo_job.tokenize_preferences(env["prefs"], tok, config, desc="t", vision=vision)


def test_prompt_forms(env):
  """Chat prompts with image parts, string prompts and prompts without a chat template."""
  config = _config(env)
  tok, vision = _vision(config)
  base = os.path.dirname(env["prefs"])
  row = {"prompt": "transcribe :", "chosen": "alpha bravo", "rejected": "alpha alpha alpha",
         "images": ["img/page0.png", "img/page3.png"]}
  def tok_pair(r, **kw):
    rec = records.validate_preference("x.jsonl:1", r)
    return tokenize.tokenize_preference(tok, rec, max_length=64, images=vision.record_images(rec, base), **kw)
  plain = tok_pair(row)
  parts = [{"type": "text", "text": "transcribe :"}]
  msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}] + parts}]
  assert tok_pair(dict(row, prompt=msgs)) == plain  # explicit image parts render as the string form does
  with pytest.raises(records.DataError, match=r"x.jsonl:1: field 'images': the prompt's messages hold 1 image parts "
                                              r"for 2 images"):
    tok_pair(dict(row, prompt=[{"role": "user", "content": [{"type": "image"}] + parts}]))
  no_chat = tok_pair(row, use_chat_template=False)
  image_id = vision.image_token_id
  n = sum(1 for t in plain.prompt if t == image_id)
  assert n == sum(plain.image_tokens) == sum(1 for t in no_chat.prompt if t == image_id) > 0
  assert no_chat.chosen[-1] == tok.eos_token_id and no_chat.prompt != plain.prompt


def test_rows_read_their_records_images():
  """Rows c0, r0, c1, r1, ... read their own record's features: placeholder k of a row takes
  feature k of its pair, counted per row (no batch-wide count); in a packed row, the pair in
  segment s counts its own placeholders and reads pair slot s - 1."""
  from jaxdpo.models import splice
  # Gemma's layout keeps the pixels grouped per record. Pairs with 1, 2 and 0 images, two slots each.
  batch = {"input_ids": jnp.zeros((3, 2, 4), jnp.int32), "segment_ids": jnp.ones((3, 2, 4), jnp.int32),
           "pixel_values": jnp.zeros((3, 2, 3, 5, 5)), "num_images": jnp.asarray([1, 2, 0], jnp.int32)}
  out = gemma3_batching.model_inputs(batch, 2)
  assert out["pixel_values"].shape == (3, 2, 3, 5, 5) and out["input_ids"].shape == (6, 4)
  # 2 images x 2 tokens per record: feature value = 4 * record + 2 * image + token.
  feats = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4, 1)
  image = np.zeros((6, 6), bool)
  image[0, 1:3] = image[1, 2:4] = True  # pair 0: one image in each row, at different places
  image[2, 0:2] = image[2, 3:5] = image[3, 0:2] = image[3, 4:6] = True  # pair 1: two images per row
  seg = np.ones((6, 6), np.int32)
  index = splice.feature_index(jnp.asarray(image), jnp.asarray(seg), 1, 4)
  got = np.asarray(splice.splice(jnp.full((6, 6, 1), -1.0), feats, index, jnp.asarray(image)))[..., 0]
  np.testing.assert_array_equal(got[0, 1:3], [0, 1])
  np.testing.assert_array_equal(got[1, 2:4], [0, 1])
  np.testing.assert_array_equal(got[2, [0, 1, 3, 4]], [4, 5, 6, 7])
  np.testing.assert_array_equal(got[3, [0, 1, 4, 5]], [4, 5, 6, 7])
  assert (got[~image] == -1).all()
  # Packed: one row, pairs in segments 1 (two placeholders) and 2 (one), 2 slots of 2 features.
  row = jnp.asarray([[True, True, False, False, True, False]])
  index = splice.feature_index(row, jnp.asarray([[1, 1, 1, 2, 2, 0]]), 2, 2)
  np.testing.assert_array_equal(np.asarray(index)[0], [0, 1, 0, 0, 2, 0])
  with pytest.raises(ValueError, match="do not split"):
    splice.splice(jnp.zeros((5, 6, 1)), feats, index.repeat(5, 0), jnp.asarray(image[:5]))


def test_qwen_positions_flatten_to_mrope_layout():
  pos = jnp.arange(2 * 2 * 3 * 5).reshape(2, 2, 3, 5)
  batch = {"input_ids": jnp.zeros((2, 2, 5), jnp.int32), "segment_ids": jnp.ones((2, 2, 5), jnp.int32),
           "positions": pos, "pixel_values": jnp.zeros((2, 8, 6)), "image_grid_thw": jnp.zeros((2, 1, 3), jnp.int32)}
  out = qwen_batching.model_inputs(batch, 2)
  assert out["positions"].shape == (3, 4, 5)
  np.testing.assert_array_equal(out["positions"][:, 3], pos[1, 1])  # row 3 = pair 1, rejected
  np.testing.assert_array_equal(out["vision_group"], [0, 0, 1, 1])
  assert out["pixel_values"].shape == (2, 8, 6)


def test_qwen_pixel_cache_repeats_the_processor_and_stays_bounded(monkeypatch, tmp_path):
  """A second collation of the same records reuses the preprocessed images (same arrays, no new
  processor call); a cache smaller than one record's images keeps nothing."""
  from jaxdpo.data.vision import images as images_lib
  from jaxdpo.data.vision import qwen as qwen_adapter
  env = dict(family="qwen2_5_vl", tok_dir=str(tmp_path / "tok"))
  VH.qwen_processor_files(env["tok_dir"])
  prefs = VH.vision_records(str(tmp_path / "data"), n=6, seed=0)[2]
  config = _config(env)
  calls = []
  real = images_lib.qwen_image_inputs
  monkeypatch.setattr(images_lib, "qwen_image_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
  for limit, expect_second in ((qwen_adapter.PIXEL_CACHE_BYTES, 0), (1, None)):
    monkeypatch.setattr(qwen_adapter, "PIXEL_CACHE_BYTES", limit)
    tok, vision = _vision(config)
    examples = dpo_job.tokenize_preferences(prefs, tok, config, desc="t", vision=vision)
    vision = vision.with_budget(examples)
    with_images = sum(1 for e in examples if e.images)
    calls.clear()
    first = pipeline.collate_pairs(examples, max_length=64, pad_id=0, vision=vision)
    assert len(calls) == with_images > 0
    second = pipeline.collate_pairs(examples, max_length=64, pad_id=0, vision=vision)
    assert len(calls) - with_images == (with_images if expect_second is None else expect_second)
    for k in first:
      np.testing.assert_array_equal(first[k], second[k])
