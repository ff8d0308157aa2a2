"""Vision DPO log-probs equal transformers' on the same tokens and images, with the tower run once
per pair.

For each family: a tiny random HF checkpoint (saved, converted), preference records with 0, 1
and 2 PNG images. Our side: records -> adapter tokenization -> `collate_pairs` -> the jitted
`dpo.step.pair_logps`. Reference side: transformers' own processor renders the same chat and
images into token ids and pixels (the Qwen2.5-VL processor is built with its torchvision-only
class check bypassed), then the HF model's forward gives the summed completion log-probs of
each row.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import _vision_job_helpers as VH
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.data import pipeline, tokenize
from jaxdpo.data.vision import images as images_lib
from jaxdpo.jobs import common
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.models import io

FAMILIES = ["qwen2_5_vl", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
  family = request.param
  root = str(tmp_path_factory.mktemp(family))
  ck, hf = VH.build_checkpoint(family, root, seed=3 if family == "qwen2_5_vl" else 7)  # seeds with varied greedy output
  _, prompts, prefs = VH.vision_records(os.path.join(root, "data"), n=6, seed=4)
  config = config_defaults.base()
  config.model.checkpoint, config.data.tokenizer = ck, os.path.join(ck, "tokenizer")
  config.data.max_length, config.train.progress = 64, False
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  examples = dpo_job.tokenize_preferences(prefs, tok, config, desc="t", vision=vision)
  vision = vision.with_budget(examples)
  batch = pipeline.collate_pairs(examples, max_length=64, pad_id=tok.pad_token_id, vision=vision)
  _, _, graphdef, params = io.load_model(ck)
  return dict(family=family, hf=hf, tok_dir=config.data.tokenizer, prefs=prefs, examples=examples, batch=batch,
              graphdef=graphdef, params=params, vision=vision, prompts=prompts, config=config, tok=tok)


def _hf_row(setup, proc, record, completion):
  """(token ids, summed completion log-prob) of one row through transformers."""
  tok = proc.tokenizer
  imgs = [Image.open(p).convert("RGB") for p in record.get("images", [])]
  user = {"role": "user", "content": [{"type": "image"} for _ in imgs] + [{"type": "text", "text": record["prompt"]}]}
  prompt_text = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
  full_text = tok.apply_chat_template([user, {"role": "assistant", "content": completion}], tokenize=False)
  kw = dict(images=imgs) if imgs else {}
  p = proc(text=[prompt_text], return_tensors="pt", **kw)
  f = proc(text=[full_text], return_tensors="pt", **kw)
  ids = f["input_ids"]
  n_prompt = int((p["input_ids"][0] == ids[0, :p["input_ids"].shape[1]]).cumprod(0).sum())
  inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
  for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids"):
    if key in f:
      inputs[key] = f[key]
  with torch.no_grad():
    logits = setup["hf"](**inputs).logits[0].double()
  lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
  return ids[0].tolist(), float(lp[n_prompt - 1:].sum())


def test_pair_logps_match_transformers(setup, monkeypatch):
  import json
  proc = VH.hf_processor(setup["family"], setup["tok_dir"], monkeypatch)
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(), model_inputs=setup["vision"].family.model_inputs)
  seq, _, counts = jax.jit(lambda p, b: step_lib.pair_logps(setup["graphdef"], p, b, scfg))(setup["params"],
                                                                                           setup["batch"])
  seq = np.asarray(seq)
  with open(setup["prefs"]) as f:
    rows = [json.loads(line) for line in f]
  assert [len(r.get("images", [])) for r in rows] == [1, 2, 0, 1, 1, 2]
  base = os.path.dirname(setup["prefs"])
  worst = 0.0
  for i, (row, ex) in enumerate(zip(rows, setup["examples"])):
    row = dict(row, images=[os.path.join(base, p) for p in row.get("images", [])])
    for j, field in enumerate(("chosen", "rejected")):
      ids, want = _hf_row(setup, proc, row, row[field])
      assert ids == ex.prompt + (ex.chosen, ex.rejected)[j]  # the processor's tokens, image tokens expanded alike
      worst = max(worst, abs(seq[i, j] - want) / abs(want))
  print(f"{setup['family']}: worst relative error of pair log-probs vs transformers {worst:.2e}")
  assert worst < 1e-4
  # The images matter: other pixels move the log-probs of the rows with images.
  moved = dict(setup["batch"], pixel_values=setup["batch"]["pixel_values"] + 0.5)
  seq2 = np.asarray(jax.jit(lambda p, b: step_lib.pair_logps(setup["graphdef"], p, b, scfg)[0])(setup["params"],
                                                                                               moved))
  has_images = np.array([bool(r.get("images")) for r in rows])
  assert np.abs(seq2 - seq)[has_images].min() > 1e-4
  np.testing.assert_allclose(seq2[~has_images], seq[~has_images], rtol=1e-6)


def test_vision_tower_runs_once_per_pair(setup, monkeypatch):
  """Tracing the pair log-probs calls the vision forward once, on one image set per pair."""
  if setup["family"] == "qwen2_5_vl":
    from jaxdpo.models.qwen2_5_vl.vision import VisionTower as Tower
  else:
    from jaxdpo.models.gemma3.siglip import SiglipVisionModel as Tower
  calls = []
  original = Tower.__call__

  def spy(self, pixels, *args, **kwargs):
    calls.append(tuple(pixels.shape))
    return original(self, pixels, *args, **kwargs)

  monkeypatch.setattr(Tower, "__call__", spy)
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(), model_inputs=setup["vision"].family.model_inputs)
  batch = setup["batch"]
  jax.eval_shape(lambda p, b: step_lib.pair_logps(setup["graphdef"], p, b, scfg), setup["params"], batch)
  pairs = batch["input_ids"].shape[0]
  budget = setup["vision"].budget
  assert pairs == 6 and budget.max_images == 2
  if setup["family"] == "qwen2_5_vl":
    # One vision row per pair: [B, P, E], not [2B, ...].
    assert calls == [(pairs, budget.max_patches, 96)]
  else:
    # Each pair's image slots once: B * I images, not 2B * I.
    assert calls == [(pairs * budget.max_images, 3, 27, 27)]


def test_greedy_generation_with_images_matches_transformers(setup):
  """The eval/mine engine: left-padded batches mixing 0, 1 and 2 images, greedy, equal HF `generate`
  run record by record (no padding)."""
  from flax import nnx
  from jaxdpo.generation import sampling as sampling_run
  new = 6
  tok, config = setup["tok"], setup["config"]
  config.generate.max_prompt_length = 48
  vision = common.vision_adapter(config, tok)
  items = sampling_run.load_prompts(setup["prompts"], tok, common.prompt_config(config), vision)
  model = nnx.merge(setup["graphdef"], setup["params"])
  rows = sampling_run.run_generation(model, tok, items, params=sampling_run.SamplingParams(new), batch_size=4,
                                     max_prompt_length=48, progress=False, vision=vision)
  assert [len(r.get("images", [])) for r in rows] == [1, 2, 0, 1, 1, 2]
  for (rec, seq), row in zip(items, rows):
    ids = torch.tensor([seq.prompt])
    kw = {}
    if seq.images:
      pil = [Image.open(p).convert("RGB") for p in seq.images]
      if setup["family"] == "qwen2_5_vl":
        vis = images_lib.qwen_image_inputs(pil, vision.processor)
        kw = dict(pixel_values=torch.tensor(vis["pixel_values"]), image_grid_thw=torch.tensor(vis["image_grid_thw"]),
                  mm_token_type_ids=(ids == vision.image_token_id).long())
      else:
        vis = images_lib.gemma3_image_inputs(pil, vision.processor)
        kw = dict(pixel_values=torch.tensor(vis["pixel_values"]), token_type_ids=(ids == vision.image_token_id).long())
    with torch.no_grad():
      out = setup["hf"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    want = out[0, ids.shape[1]:].tolist()
    assert row["tokens"] == want[:row["num_generated"]] and len(want) == row["num_generated"], (rec.where, row, want)
  # Not a degenerate comparison: rows with images do not all produce the same continuation.
  assert len({tuple(r["tokens"]) for r in rows if r.get("images")}) >= 2
