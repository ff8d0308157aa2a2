"""`config.job = "demo"`: the study reproduced on rendered pages, six stages in one job.

  0. (data) render the SFT / mine / held-out pages and write the demo tokenizer;
  1. SFT a randomly initialised `demo_vl` Qwen2.5-VL on the SFT pages;
  2. eval the SFT model on the held-out pages (greedy);
  3. mine the SFT model's own samples on the mine pages: chosen = the page's transcription,
     rejected = a degenerate sample (no fallback: a stage that finds none stops, explaining why);
  4. DPO from the SFT checkpoint, the SFT model as the frozen reference, with an SFT term
     (`dpo.rpo_alpha`) so that the model does not learn to stop early;
  5. the control: SFT continued from the SFT checkpoint on the same mined pages with their correct
     transcriptions, with DPO's steps, batch size and learning rate;
  6. eval the DPO and the control models on the same held-out pages;
then DIR/report.{json,md,png} (jaxdpo.demo.report), recomputed from the three generations.jsonl.

Every stage writes into DIR/<n>_<name>/ and marks itself done there (stage_done.json, with its
wall time); a re-run skips finished stages and resumes a training stage from its checkpoint.
"""

from __future__ import annotations

import dataclasses

import json
import os
import time

import ml_collections

from jaxdpo.demo import pages as pages_lib
from jaxdpo.demo import report as report_lib
from jaxdpo.demo import tokenizer as demo_tokenizer
from jaxdpo.errors import UserError
from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import evaluate as eval_job
from jaxdpo.jobs import jsonio
from jaxdpo.jobs import mine as mine_job
from jaxdpo.jobs import sft as sft_job
from jaxdpo.jobs import validate
from jaxdpo.models import registry

STAGES = ("sft", "eval_sft", "mine", "dpo", "control", "eval_after")
TITLES = {"sft": "SFT on the SFT pages", "eval_sft": "eval of SFT on the held-out pages",
          "mine": "mining the SFT model's loops on the mine pages", "dpo": "DPO from SFT (SFT as reference)",
          "control": "control: SFT continued on the mined pages", "eval_after": "eval of DPO and the control"}
DONE = "stage_done.json"


class DemoStopped(UserError, RuntimeError):
  """A stage found nothing the next one could use; the message says what happened and what to change."""


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, f"{STAGES.index(name) + 1}_{name}")


def _sub_config(config, job: str, **overrides) -> ml_collections.ConfigDict:
  """A copy of the demo config for one job, with dotted overrides ("optim.lr": 1e-3)."""
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.job = job
  for key, value in overrides.items():
    node = sub
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  validate.check(sub)
  return sub


def _run_job(run, config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return run(config, workdir)


def _model(model_dir: str) -> dict:
  return {"model.checkpoint": model_dir, "data.tokenizer": os.path.join(model_dir, "tokenizer")}


def prepare_data(config, workdir: str) -> dict[str, str]:
  """Renders the three splits and writes the tokenizer (once; a re-run reuses them)."""
  d = os.path.join(workdir, "data")
  marker = os.path.join(d, DONE)
  paths = {s: os.path.join(d, f"{s}.jsonl") for s in ("sft", "mine", "heldout")}
  paths["tokenizer"] = os.path.join(d, "tokenizer")
  if os.path.exists(marker):
    return paths
  family = config.model.family
  if family not in ("qwen2_5_vl", "gemma3") or config.model.checkpoint:
    raise UserError(f"config.model: the demo trains a fresh qwen2_5_vl or gemma3 preset (got family "
                    f"{family!r}, checkpoint {config.model.checkpoint!r})")
  model_cfg = registry.get_family(family).presets[config.model.preset]()
  v = model_cfg.vision
  dm = config.demo
  sizes = {"sft": dm.sft_pages, "mine": dm.mine_pages, "heldout": dm.heldout_pages}
  if family == "qwen2_5_vl":
    if v.patch_size * v.spatial_merge_size != pages_lib.script.CELL or model_cfg.text.vocab_size != \
        demo_tokenizer.VOCAB_SIZE or model_cfg.image_token_id != 60:
      raise UserError(f"config.model.preset={config.model.preset!r}: the demo pages need {pages_lib.script.CELL}-px "
                      f"merged vision tokens and the demo tokenizer's {demo_tokenizer.VOCAB_SIZE} ids (use demo_vl)")
    specs = pages_lib.SPLITS
    pages_lib.write_splits(d, sizes, seed=config.seed, specs=specs)
    demo_tokenizer.write(paths["tokenizer"], patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                         temporal_patch_size=v.temporal_patch_size, min_pixels=min(s.pixels for s in specs.values()),
                         max_pixels=max(s.pixels for s in specs.values()))
  else:
    # SigLIP sees one fixed square: every split is rendered on the square canvas the preset reads, one
    # glyph cell per pooled image token (the splits keep their content, only the canvas changes).
    side = int(round(model_cfg.mm_tokens_per_image ** 0.5))
    if v.image_size != side * pages_lib.script.CELL or model_cfg.text.vocab_size != demo_tokenizer.GEMMA_VOCAB_SIZE \
        or model_cfg.image_token_id != max(demo_tokenizer.GEMMA_IMAGE):
      raise UserError(f"config.model.preset={config.model.preset!r}: the Gemma 3 demo needs one pooled image token "
                      f"per {pages_lib.script.CELL}-px cell and the demo tokenizer's "
                      f"{demo_tokenizer.GEMMA_VOCAB_SIZE} ids (use demo_gemma)")
    # A half-cell offset (`PageSpec.x_offset_px`) widens the canvas by one cell: one glyph column less keeps it square.
    specs = {}
    for k, s in pages_lib.SPLITS.items():
      cols = side - (1 if s.x_offset_px else 0)
      specs[k] = dataclasses.replace(s, cols=cols, rows=side, line_words=min(s.line_words, cols))
    pages_lib.write_splits(d, sizes, seed=config.seed, specs=specs)
    demo_tokenizer.write_gemma(paths["tokenizer"], image_size=v.image_size)
  jsonio.write_json(marker, {"pages": {"sft": dm.sft_pages, "mine": dm.mine_pages, "heldout": dm.heldout_pages},
                             "seed": config.seed})
  return paths


def _stage_sft(config, out, data):
  dm = config.demo
  _run_job(sft_job.run, _sub_config(
      config, "sft", **{"data.train": data["sft"], "data.tokenizer": data["tokenizer"],
                        "train.num_steps": dm.sft_steps, "train.batch_size": dm.sft_batch_size,
                        "optim.lr": dm.sft_lr, "optim.warmup_steps": dm.sft_warmup_steps}), out)


def _stage_eval(config, out, model_dir, data):
  _run_job(eval_job.run, _sub_config(config, "eval", **{"data.prompts": data["heldout"], **_model(model_dir)}), out)


def _stage_mine(config, out, sft_model, data):
  try:
    summary = _run_job(mine_job.run, _sub_config(
        config, "mine", **{"data.prompts": data["mine"], "mine.chosen": "reference", "mine.rejected": "degenerate",
                           **_model(sft_model)}), out)
  except mine_job.NoPairsError as e:  # the demo's own message says what to change in the demo
    summary = e.summary
  if summary["pairs_rejected_degenerate"] == 0:
    raise DemoStopped(
        f"stage 3/6 (mine): the SFT model's {summary['samples']} samples on {summary['records']} mine pages hold "
        f"no degenerate sample, so there is no loop for DPO to learn from (see {out}/samples.jsonl). To find "
        "loops, mine more pages (config.demo.mine_pages), sample more "
        "(config.mine.num_samples, config.mine.temperature), or make the pages harder.")
  return summary


def _dpo_overrides(config, sft_model, pairs, max_pair_length):
  dm = config.demo
  return {"data.train": pairs, **_model(sft_model), "train.num_steps": dm.dpo_steps,
          "train.batch_size": dm.dpo_batch_size, "optim.lr": dm.dpo_lr, "optim.warmup_steps": dm.dpo_warmup_steps,
          # The pairs' length decides: a loop is max_new_tokens long, longer than any SFT page.
          "data.max_length": max(config.data.max_length, max_pair_length)}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the six stages and writes the report; returns the report dict."""
  t_data = time.perf_counter()
  data = prepare_data(config, workdir)
  t_data = time.perf_counter() - t_data
  seconds: dict[str, float] = {}
  sft_model = os.path.join(stage_dir(workdir, "sft"), "model")
  mine_dir = stage_dir(workdir, "mine")
  pairs_path = os.path.join(mine_dir, "pairs.jsonl")
  after = stage_dir(workdir, "eval_after")
  for i, name in enumerate(STAGES, start=1):
    out = stage_dir(workdir, name)
    marker = os.path.join(out, DONE)
    if os.path.exists(marker):
      with open(marker) as f:
        seconds[name] = json.load(f)["seconds"]
      print(f"[stage {i}/6] {TITLES[name]}: done earlier ({seconds[name]:.0f}s), skipped", flush=True)
      continue
    print(f"[stage {i}/6] {TITLES[name]}", flush=True)
    t0 = time.perf_counter()
    if name == "sft":
      _stage_sft(config, out, data)
    elif name == "eval_sft":
      _stage_eval(config, out, sft_model, data)
    elif name == "mine":
      _stage_mine(config, out, sft_model, data)
    elif name == "dpo":
      with open(os.path.join(mine_dir, "mine_summary.json")) as f:
        need = json.load(f)["max_pair_length"]
      _run_job(dpo_job.run, _sub_config(config, "dpo", **_dpo_overrides(config, sft_model, pairs_path, need)), out)
    elif name == "control":
      control = [{"prompt": p["prompt"], "completion": p["chosen"], "images": p["images"]}
                 for p in report_lib.read_jsonl(pairs_path)]
      os.makedirs(out, exist_ok=True)
      jsonio.write_jsonl(os.path.join(out, "control.jsonl"), control)
      dm = config.demo
      _run_job(sft_job.run, _sub_config(
          config, "sft", **{"data.train": os.path.join(out, "control.jsonl"), **_model(sft_model),
                            "train.num_steps": dm.dpo_steps, "train.batch_size": dm.dpo_batch_size,
                            "optim.lr": dm.dpo_lr, "optim.warmup_steps": dm.dpo_warmup_steps}), out)
    else:
      for which in ("dpo", "control"):
        _stage_eval(config, os.path.join(out, which), os.path.join(stage_dir(workdir, which), "model"), data)
    seconds[name] = time.perf_counter() - t0
    jsonio.write_json(marker, {"seconds": seconds[name]})
  with open(os.path.join(mine_dir, "mine_summary.json")) as f:
    mine_summary = json.load(f)
  rep = report_lib.build(
      {"sft": os.path.join(stage_dir(workdir, "eval_sft"), "generations.jsonl"),
       "dpo": os.path.join(after, "dpo", "generations.jsonl"),
       "control": os.path.join(after, "control", "generations.jsonl")},
      mine_summary, report_lib.read_jsonl(pairs_path), {"data": t_data, **seconds},
      {"seed": config.seed, "pages": config.seed, "mine_sampling": config.seed})
  rep["sft_training"] = _training_summary(stage_dir(workdir, "sft"))
  paths = report_lib.write(rep, workdir)
  print(report_lib.markdown(rep))
  print(f"report: {paths['md']}, {paths['json']}, {paths['png']}")
  return rep


def _training_summary(sft_dir: str) -> dict:
  """SFT's loss curve ends: first, last and the mean of the last fifth of logged losses (the plateau)."""
  path = os.path.join(sft_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  losses = [(r["step"], r["loss"]) for r in report_lib.read_jsonl(path) if "loss" in r]
  if not losses:
    return {}
  tail = losses[-max(1, len(losses) // 5):]
  return {"first_loss": losses[0][1], "last_loss": losses[-1][1], "plateau_loss": sum(l for _, l in tail) / len(tail),
          "plateau_from_step": tail[0][0], "steps": losses[-1][0]}
