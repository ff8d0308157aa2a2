"""Vision features stay with their pair (issue 16 acceptance 3): the vision DPO train step compiled
on a data=4 mesh (4 of the 8 fake CPU devices, one pair per device) moves no vision features
between devices: no all-gather, all-to-all or collective-permute in the compiled HLO has the
features' shape (nor the batch's image-token mask, which a batch-wide placeholder count needs).

Both vision families (Qwen2.5-VL, Gemma 3) in the two-row layout, Qwen2.5-VL in the shared
[P | C | R] layout (one row per pair) and Gemma 3 in packed rows (several pairs per row, their
images per pair slot). Negative control: the former flat splice (Qwen `vision_row`,
Gemma images flattened over the batch and counted row-major) compiled the same way is flagged,
so the check can fail. Compile-only: nothing runs.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import pytest

import _vision_job_helpers as VH
from jaxdpo.data import pipeline, shared_rows, tokenize
from jaxdpo.jobs import common
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup
from jaxdpo.models import registry
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import loop as train
from jaxdpo.train import update
from tests._dpo_helpers import grad_recorder

PRESETS = {"qwen2_5_vl": "tiny_vl", "gemma3": "tiny"}
# The shared layout's splice is the two-row one with one row per group, the packed one adds pair
# slots: each checked once (a compile costs ~12 s of CPU).
LAYOUTS = {"qwen2_5_vl": ("pairs", "shared"), "gemma3": ("pairs", "packed")}
DATA4 = {"data": 4, "fsdp": 1, "tensor": 1}
MOVES = ("all-gather", "all-gather-start", "all-to-all", "collective-permute", "collective-permute-start")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(MOVES) + r")\(")
_SHAPE = re.compile(r"\b(pred|[su]\d+|f\d+|bf16)\[([\d,]*)\]")


@pytest.fixture(scope="module", params=sorted(PRESETS))
def setup(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  c = config_defaults.base()
  c.model.family, c.model.preset = family, PRESETS[family]
  c.data.max_length, c.train.progress, c.train.batch_size = 64, False, 4
  c.data.tokenizer = str(root / "tok")
  (VH.qwen_processor_files if family == "qwen2_5_vl" else VH.gemma_processor_files)(c.data.tokenizer)
  _, _, prefs = VH.vision_records(str(root / "data"), n=6, seed=0)
  tok = tokenize.load_tokenizer(c.data.tokenizer)
  vision = common.vision_adapter(c, tok)
  pairs = dpo_job.tokenize_preferences(prefs, tok, c, desc="t", vision=vision)[:4]
  vision = vision.with_budget(pairs)
  pad = tokenize.pad_token_id(tok)
  length, slots = shared_rows.shape_for(pairs)
  batches = {"pairs": pipeline.collate_pairs(pairs, max_length=64, pad_id=pad, vision=vision),
             "shared": pipeline.collate_shared(pairs, max_length=64, pad_id=pad, vision=vision, length=length,
                                               slots=slots),
             # Several pairs per row (row_multiple 4: one packed row per device), images per pair slot.
             "packed": pipeline.collate_packed(pairs, max_length=64, pad_id=pad, vision=vision, row_multiple=4,
                                               pack_tokens=2 * max(len(p.prompt) + len(p.chosen) + len(p.rejected)
                                                                   for p in pairs))}
  mesh = shd.make_mesh(DATA4)
  bundle = model_setup.setup_model(c.model, mesh, shd.DEFAULT_RULES, seed=0)
  return dict(config=c, batches=batches, mesh=mesh, bundle=bundle)


def _compiled_hlo(setup, layout: str, model_inputs=None) -> str:
  mesh, bundle = setup["mesh"], setup["bundle"]
  tx = grad_recorder()
  params = bundle.params
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  scfg = dpo_job.step_config(setup["config"], bundle.family)
  if model_inputs is not None:
    scfg = dataclasses.replace(scfg, model_inputs=model_inputs)
  step = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh,
                                jax.tree.map(lambda x: x.sharding, state), bundle.param_shardings, lambda s: 0.0)
  return step.lower(state, params, shd.put_batch(setup["batches"][layout], mesh)).compile().as_text()


def _feature_shape(setup) -> tuple[int, int]:
  """(tokens per image row, width) of the vision features the splice reads."""
  cfg = setup["bundle"].config
  if setup["config"].model.family == "qwen2_5_vl":
    return setup["batches"]["pairs"]["pixel_values"].shape[1] // cfg.vision.merge_unit, cfg.vision.out_hidden_size
  return cfg.mm_tokens_per_image, cfg.text.hidden_size


def moved_features(hlo: str, setup, layout: str) -> list[str]:
  """Cross-device moves of the vision features (width D, a whole number of image rows of G
  tokens: [B*G, D], [B*I, M, D], ...) or of the image-token mask ([text rows x T] ints or bools)."""
  g, d = _feature_shape(setup)
  ids = setup["batches"][layout]["input_ids"]
  mask_size = math.prod(ids.shape)
  found = []
  for line in hlo.splitlines():
    op = _OP.search(line)
    if not op:
      continue
    for dtype, dims in _SHAPE.findall(op.group(1)):
      shape = [int(x) for x in dims.split(",") if x]
      size = math.prod(shape)
      features = dtype.startswith(("f", "bf")) and shape and shape[-1] == d and (size // d) % g == 0
      mask = not dtype.startswith(("f", "bf")) and size == mask_size
      if features or mask:
        found.append(line.strip()[:200])
        break
  return found


def _flat_splice(family: str):
  """The former flat splice, as a `model_inputs`: Qwen's `vision_row` gather over the batch's vision
  rows; Gemma's images flattened over the batch, placeholder runs counted row-major."""
  grouped = registry.get_family(family).model_inputs

  def model_inputs(batch, rows_per_record):
    out = grouped(batch, rows_per_record)
    if family == "qwen2_5_vl":
      out["vision_row"] = out.pop("vision_group")
    else:
      pixels = out["pixel_values"]
      out["pixel_values"] = pixels.reshape((-1,) + pixels.shape[2:])
    return out

  return model_inputs


def test_vision_features_stay_on_their_pairs_device(setup):
  assert len(jax.devices()) >= 4
  for layout in LAYOUTS[setup["config"].model.family]:
    moved = moved_features(_compiled_hlo(setup, layout), setup, layout)
    assert not moved, f"{layout}: vision features (or the image mask) cross devices:\n" + "\n".join(moved)


def test_the_check_flags_a_flat_splice(setup):
  """Negative control: the flat gather across the batch all-gathers the features, and is flagged."""
  hlo = _compiled_hlo(setup, "pairs", model_inputs=_flat_splice(setup["config"].model.family))
  assert moved_features(hlo, setup, "pairs")
