"""Vision presets export to HF: the derived config.json loads with `from_pretrained`, and the
exported model gives the jax model's logits on a text + image batch (issue 10).

The preset model is built directly (no job run) and every parameter is perturbed, standing in
for training: a freshly initialised model has unit norms and zero biases, under which a wrong
norm or bias mapping would go unnoticed. The job-level check (a trained `tiny_vl.py` chain
exported and loaded) is in tests/test_readme_vision.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import _gemma_helpers as G
from jaxdpo import assets
from jaxdpo.cli import convert as cli
from jaxdpo.data.vision import images as images_lib
from jaxdpo.models import io, registry
from jaxdpo.models.qwen2_5_vl import inputs as qin


def _preset_model(family_name: str, preset: str, seed: int = 0):
  """(family, config, model) of a preset with every parameter perturbed by N(0, 0.05)."""
  family = registry.get_family(family_name)
  cfg = family.presets[preset]()
  model = family.build(cfg, nnx.Rngs(seed), jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.RandomState(seed)
  pure = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32),
                      nnx.to_pure_dict(params))
  nnx.replace_by_pure_dict(params, pure)
  return family, cfg, nnx.merge(graphdef, params, rest)


def _export(tmp_path, family, cfg, model) -> str:
  """DIR/model as a job writes it for a preset (config.json derived), then `jax-to-hf` through the CLI."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  model_dir = io.export_model_dir(str(tmp_path / "model"), family, cfg, params, hf_config=family.config_to_hf(cfg))
  hf_dir = str(tmp_path / "hf")
  assert cli.main(["jax-to-hf", "--ckpt", model_dir, "--out", hf_dir]) == 0
  return hf_dir


def _load_hf(cls, hf_dir: str):
  hf, info = cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                 output_loading_info=True)
  assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched keys
  return hf.eval()


@nnx.jit
def _logits(model, inputs):
  return model.logits(model.hidden_states(inputs))


def _rel_err(ours, ref, mask) -> float:
  ours, ref = np.asarray(ours, np.float64)[mask], np.asarray(ref, np.float64)[mask]
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("preset", ["demo_vl", "tiny_vl"])
def test_qwen2_5_vl_preset_round_trips_its_config(preset):
  family = registry.get_family("qwen2_5_vl")
  cfg = family.presets[preset]()
  assert family.config_from_hf(family.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family_name,preset", [("gemma3", "tiny"), ("gemma3", "gemma3_4b"),
                                                ("gemma3_text", "tiny_text"), ("gemma3_text", "gemma3_4b_text"),
                                                ("qwen2_5_vl", "qwen2_5_vl_3b")])
def test_gemma3_and_full_size_presets_round_trip_their_config(family_name, preset):
  family = registry.get_family(family_name)
  cfg = family.presets[preset]()
  assert family.config_from_hf(family.config_to_hf(cfg)) == cfg


def test_demo_vl_preset_exports_and_matches_transformers_on_an_image(tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  family, cfg, model = _preset_model("qwen2_5_vl", "demo_vl")
  hf = _load_hf(Qwen2_5_VLForConditionalGeneration, _export(tmp_path, family, cfg, model))
  # One of the shipped pages through the shipped processor: 32x24 px -> grid (1, 6, 8), 12 tokens.
  tok_dir = assets.path("tiny_vl/tokenizer")
  page = sorted(os.listdir(assets.path("tiny_vl/pages")))[0]
  vision = images_lib.qwen_image_inputs([assets.path(f"tiny_vl/pages/{page}")],
                                        images_lib.qwen_image_processor(tok_dir))
  n = int(vision["num_image_tokens"][0])
  rng = np.random.RandomState(1)
  text = lambda k: rng.randint(3, 60, k).tolist()
  rows = [text(3) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id] + text(6),
          text(9)]
  t = max(len(r) for r in rows)
  ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
  for i, r in enumerate(rows):  # left padding, as generation uses
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             pixel_values=torch.tensor(vision["pixel_values"]), image_grid_thw=torch.tensor(vision["image_grid_thw"]),
             mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64))).logits.numpy()
  inputs = qin.make_inputs(cfg, ids, mask, vision["pixel_values"], vision["image_grid_thw"])
  ours = np.asarray(_logits(model, {k: jnp.asarray(x) for k, x in inputs.items()}))
  assert ours.shape == ref.shape
  real = mask.astype(bool)
  assert _rel_err(ours, ref, real) < 1e-5
  # The image row depends on the pixels (so the check covers the vision tower's mapping too).
  inputs["pixel_values"] = inputs["pixel_values"] + 0.5
  moved = np.asarray(_logits(model, {k: jnp.asarray(x) for k, x in inputs.items()}))
  assert _rel_err(moved[:1], ref[:1], real[:1]) > 1e-3


def test_gemma3_preset_exports_and_matches_transformers_on_an_image(tmp_path):
  from transformers import Gemma3ForConditionalGeneration
  family, cfg, model = _preset_model("gemma3", "tiny")
  hf = _load_hf(Gemma3ForConditionalGeneration, _export(tmp_path, family, cfg, model))
  ids, seg, pos = G.pad_batch(G.mm_rows(seed=1), 36, left=False)
  assert (ids == cfg.image_token_id).sum(axis=1).tolist() == [9, 18, 0]
  pixels = np.clip(G.random_pixels(3, seed=2), -1, 1)  # as the processor's (x / 255 - 0.5) / 0.5
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels),
             attention_mask=torch.tensor(seg), position_ids=torch.tensor(pos, dtype=torch.long),
             token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64))).logits.numpy()
  inputs = dict(input_ids=ids, segment_ids=seg, positions=pos, pixel_values=pixels)
  ours = np.asarray(_logits(model, {k: jnp.asarray(x) for k, x in inputs.items()}))
  real = seg != 0
  assert _rel_err(ours, ref, real) < 1e-5
  inputs["pixel_values"] = -pixels
  moved = np.asarray(_logits(model, {k: jnp.asarray(x) for k, x in inputs.items()}))
  assert _rel_err(moved[:2], ref[:2], real[:2]) > 1e-3


def test_gemma3_text_preset_exports_and_matches_transformers(tmp_path):
  from transformers import Gemma3ForCausalLM
  family, cfg, model = _preset_model("gemma3_text", "tiny_text")
  hf = _load_hf(Gemma3ForCausalLM, _export(tmp_path, family, cfg, model))
  rows = [list(np.random.RandomState(5).randint(0, cfg.vocab_size, n)) for n in (23, 17)]
  ids, seg, pos = G.pad_batch(rows, 23, left=False)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(seg),
             position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
  ours = np.asarray(_logits(model, {k: jnp.asarray(x) for k, x in dict(input_ids=ids, segment_ids=seg,
                                                                           positions=pos).items()}))
  assert _rel_err(ours, ref, seg != 0) < 1e-5


def test_a_config_transformers_cannot_express_is_refused():
  import dataclasses
  from jaxdpo.errors import ConversionError
  family = registry.get_family("gemma3")
  cfg = family.presets["tiny"]()
  capped = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, final_logit_softcapping=30.0))
  with pytest.raises(ConversionError, match="final_logit_softcapping=30.0: Gemma3ForConditionalGeneration"):
    family.config_to_hf(capped)
  qwen = registry.get_family("qwen2_5_vl")
  cfg = qwen.presets["demo_vl"]()
  odd = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, head_dim=8, mrope_section=(2, 1, 1)))
  with pytest.raises(ConversionError, match="head_dim=8 x 4 heads != hidden_size=64"):
    qwen.config_to_hf(odd)
