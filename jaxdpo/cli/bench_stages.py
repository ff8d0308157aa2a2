"""Memory and time estimates of each stage of the full-scale pipeline (`python -m jaxdpo.bench --stages`).

  python -m jaxdpo.bench --stages [--families nanonets_ocr2_3b,qwen2_5_vl_3b,gemma3_4b] [--json]

For each shipped full-size model and each stage of README "Real weights" (convert, eval, mine, dpo,
eval, export), on one NVIDIA H200 and on a TPU v5e-8, this prints the per-device memory and the time
of a stated workload. These are planner estimates, not measurements (no GPU or TPU has run them):

* **Memory** comes from shapes only, nothing is allocated:
  - dpo: `parallel.memory.plan_dpo` of the shipped `*_dpo.py` config on an abstract mesh of the
    accelerator's devices (parameters, optimizer state, reference, gradients exact from the sharded
    shapes; activations from the planner's per-policy formula, a floor);
  - eval and mine: the bf16 weights of the shipped `*_eval.py` / `*_mine.py` config divided over the
    devices, plus the generation cache of the device's rows, sized by `jax.eval_shape` of the model's
    own `init_cache` (exact, Gemma 3's sliding-window rings included), plus one prefill layer's
    activations for those rows (an estimate);
  - convert and export run on the host: about three parts of 1 GiB (BUILD_NOTES, streaming conversion).
* **Time** is FLOPs or bytes divided by the accelerator's peak times an efficiency (`Assumptions`):
  training at `train_mfu` of bf16 peak on the README's model-FLOPs formula (the policy x3, the live
  reference x1, the vision tower once per pair); prefill at `prefill_mfu`; each decode step reads the
  weights and the rows' caches at `decode_bandwidth_share` of HBM bandwidth (or is FLOP-bound when
  that is slower). Eval uses row refill, so rows stay busy; mine samples with static batches (refill
  is greedy-only), which last as long as their longest row: `mine_batch_tokens` decode steps each,
  a loop being cut early by `stop_on_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.jobs import dpo as dpo_job
from jaxdpo.jobs import model_setup
from jaxdpo.models import registry
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd

FAMILIES = ("nanonets_ocr2_3b", "qwen2_5_vl_3b", "gemma3_4b")
STAGES = ("convert", "eval (SFT model)", "mine", "dpo", "eval (DPO model)", "export")


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A machine of `chips` identical devices (peak figures per chip, from the vendors' data sheets)."""
  name: str
  chips: int
  bf16_tflops: float
  hbm_gb_per_s: float
  hbm_gb: float


H200 = Accelerator("1x NVIDIA H200", 1, 989.0, 4800.0, 141.0)
V5E_8 = Accelerator("TPU v5e-8", 8, 197.0, 819.0, 16.0)
ACCELERATORS = (H200, V5E_8)


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """The planning figures behind the time estimates (assumptions, not measurements).

  Attributes:
    train_mfu: share of bf16 peak the DPO step reaches on the README's model FLOPs (TRL reached
      0.27-0.55 on the bench workloads on an H200; 0.40 is a middle figure).
    prefill_mfu: the same for a prompt's forward pass.
    decode_bandwidth_share: share of HBM bandwidth a decode step reaches reading weights and caches.
    eval_pages, mine_pages, mine_samples: the workload sizes.
    mean_new_tokens: mean transcription length in tokens; loop_rate: share of outputs that loop to
      the limit (eval) or are cut by `stop_on_loop` (mine).
    mine_batch_tokens: decode steps of one static mine batch (its longest non-looping row).
    dpo_pairs, dpo_epochs: the DPO stage's data.
  """
  train_mfu: float = 0.40
  prefill_mfu: float = 0.40
  decode_bandwidth_share: float = 0.70
  eval_pages: int = 1000
  mine_pages: int = 4000
  mine_samples: int = 4
  mean_new_tokens: int = 600
  loop_rate: float = 0.03
  mine_batch_tokens: int = 900
  dpo_pairs: int = 2000
  dpo_epochs: int = 1


def _config(name: str):
  return importlib.import_module(f"jaxdpo.configs.{name}").get_config()


def _mesh(acc: Accelerator):
  # Every shipped full-size config shards over all devices (fsdp=-1); an abstract mesh sizes the
  # shardings without needing the devices.
  return jax.sharding.AbstractMesh((1, acc.chips, 1), shd.MESH_AXES)


@functools.lru_cache(maxsize=8)
def _abstract_model(family_name: str, preset: str, dtype: str):
  """(model config, abstract model) of a preset; building a full-size one abstractly takes seconds."""
  family = registry.get_family(family_name)
  cfg = family.presets[preset]()
  return cfg, nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0), jnp.dtype(dtype), None))


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


VISION_ROOTS = ("visual", "vision_tower", "multi_modal_projector")


def _param_counts(model) -> tuple[int, int, int]:
  """(all, vision tower + projector, input embedding) parameter counts of an abstract model."""
  total = vision = embed = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = int(np.prod(var.get_value().shape))
    total += n
    if str(path[0]) in VISION_ROOTS:
      vision += n
    elif str(path[-1]) == "embed_tokens":
      embed += n
  return total, vision, embed


def _vision_tokens(cfg) -> int:
  """Vision-tower tokens of one page (before merging): Qwen2.5-VL's budget of 1024 merged tokens is
  4096 patches; Gemma 3's SigLIP sees its fixed image size."""
  vision = getattr(cfg, "vision", None)
  if vision is None:
    return 0
  if hasattr(vision, "image_size") and hasattr(vision, "patch_size") and not hasattr(vision, "spatial_merge_size"):
    return (vision.image_size // vision.patch_size) ** 2
  merge = getattr(vision, "spatial_merge_size", 2)
  return 1024 * merge * merge


def flops_per_token(n_text: int, n_embed: int, text_cfg, seq: int) -> float:
  """The README's model FLOPs of one token's forward: 2 x non-embedding params + 2VD + 2LTD."""
  d = text_cfg.hidden_size
  return 2 * (n_text - n_embed) + 2 * text_cfg.vocab_size * d + 2 * text_cfg.num_layers * seq * d


@dataclasses.dataclass(frozen=True)
class StageEstimate:
  """One row of the table: a stage of one model on one accelerator."""
  family: str
  accelerator: str
  stage: str
  memory_gb_per_device: float
  memory_where: str  # "device" or "host"
  seconds: float | None
  workload: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def generation_estimate(name: str, acc: Accelerator, a: Assumptions, job: str, config=None) -> StageEstimate:
  """Memory and time of the eval or mine stage of `name` (a shipped config prefix) on `acc`.

  `config` replaces the shipped `{name}_{job}.py` config (tests pass tiny ones).
  """
  c = config if config is not None else _config(f"{name}_{job}")
  cfg, model = _abstract_model(c.model.family, c.model.preset, c.model.param_dtype)
  text = getattr(cfg, "text", cfg)
  g = c.generate
  rows_total = g.batch_size
  rows_dev = max(1, rows_total // acc.chips)  # the batch is split over the data axes (data x fsdp)
  ctx = g.max_prompt_length + g.max_new_tokens
  cache_dev = _bytes(jax.eval_shape(lambda: model.init_cache(rows_dev, ctx, jnp.dtype(c.model.param_dtype))))
  weights = _bytes(nnx.state(model, nnx.Param))
  itemsize = jnp.dtype(c.model.param_dtype).itemsize
  d, f = text.hidden_size, text.intermediate_size
  prefill_act = rows_dev * g.max_prompt_length * (4 * d + 3 * f) * itemsize + rows_dev * text.vocab_size * 4
  mem = weights / acc.chips + cache_dev + prefill_act
  n_all, n_vision, n_embed = _param_counts(model)
  n_text = n_all - n_vision
  pages = a.eval_pages if job == "eval" else a.mine_pages
  outputs = pages * (1 if job == "eval" else a.mine_samples)
  peak = acc.chips * acc.bf16_tflops * 1e12
  prefill = outputs * (flops_per_token(n_text, n_embed, text, g.max_prompt_length) * g.max_prompt_length
                       + 2 * n_vision * _vision_tokens(cfg)) / (peak * a.prefill_mfu)
  if job == "eval":  # refill keeps every row busy: decode steps = all generated tokens / rows
    tokens = outputs * ((1 - a.loop_rate) * a.mean_new_tokens + a.loop_rate * g.max_new_tokens)
    steps = tokens / rows_total
  else:  # static sampled batches, each as long as its longest row
    steps = math.ceil(outputs / rows_total) * min(a.mine_batch_tokens, g.max_new_tokens)
  mean_ctx = g.max_prompt_length + a.mean_new_tokens / 2
  cache_read = cache_dev * acc.chips * mean_ctx / ctx  # the part of the caches a step attends over
  bytes_step = weights + cache_read
  flops_step = 2 * n_text * rows_total
  step_s = max(bytes_step / (acc.chips * acc.hbm_gb_per_s * 1e9 * a.decode_bandwidth_share),
               flops_step / (peak * a.prefill_mfu))
  workload = (f"{pages} pages" + ("" if job == "eval" else f" x {a.mine_samples} samples")
              + f", {g.batch_size} rows, prompt {g.max_prompt_length}, <= {g.max_new_tokens} new tokens")
  return StageEstimate(name, acc.name, job, mem / 1e9, "device", prefill + steps * step_s, workload)


def dpo_estimate(name: str, acc: Accelerator, a: Assumptions, config=None) -> StageEstimate:
  """Memory (the planner) and time of the DPO stage of `name` on `acc` (`config`: as for
  `generation_estimate`)."""
  c = config if config is not None else _config(f"{name}_dpo")
  run = dpo_job.memory_run(c)
  mesh = _mesh(acc)
  plan = memory.plan_dpo(run, mesh, model_setup.parse_rules(c.sharding_rules))
  cfg, model = _abstract_model(c.model.family, c.model.preset, "bfloat16")  # counts only (shared with eval)
  text = getattr(cfg, "text", cfg)
  n_all, n_vision, n_embed = _param_counts(model)
  seq = c.data.max_length  # each side of a pair is a row padded to max_length (upper bound)
  per_pair = 2 * seq * flops_per_token(n_all - n_vision, n_embed, text, seq) * (3 + (1 if run.reference_model else 0))
  per_pair += 2 * n_vision * _vision_tokens(cfg)  # the tower runs once per pair (frozen: forward only)
  seconds = a.dpo_pairs * a.dpo_epochs * per_pair / (acc.chips * acc.bf16_tflops * 1e12 * a.train_mfu)
  workload = (f"{a.dpo_pairs} pairs x {a.dpo_epochs} epoch, batch {c.train.batch_size} "
              f"(grad_accum {c.train.grad_accum}), rows of {seq}, remat {c.train.remat}")
  return StageEstimate(name, acc.name, "dpo", plan.total / 1e9, "device", seconds, workload)


def host_estimate(name: str, acc: Accelerator, stage: str) -> StageEstimate:
  """convert / export: streaming, on the host; about three 1 GiB parts live at a time."""
  return StageEstimate(name, acc.name, stage, 3 * 2 ** 30 / 1e9 + 0.21, "host", None,
                       "I/O-bound: reads and writes the model once")


def estimates(names=FAMILIES, accelerators=ACCELERATORS, a: Assumptions = Assumptions()) -> list[StageEstimate]:
  """Every stage of every model on every accelerator, in pipeline order."""
  out = []
  for name in names:
    for acc in accelerators:
      ev = generation_estimate(name, acc, a, "eval")
      out += [host_estimate(name, acc, "convert"), dataclasses.replace(ev, stage=STAGES[1]),
              generation_estimate(name, acc, a, "mine"), dpo_estimate(name, acc, a),
              dataclasses.replace(ev, stage=STAGES[4]), host_estimate(name, acc, "export")]
  return out


def _fmt_s(s: float | None) -> str:
  if s is None:
    return "I/O-bound"
  return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def table(rows: list[StageEstimate]) -> str:
  """A markdown table: one line per model and stage, one column pair per accelerator."""
  accs = list(dict.fromkeys(r.accelerator for r in rows))
  head = "| model | stage | " + " | ".join(f"{a}: memory / device | {a}: time" for a in accs) + " |"
  lines = [head, "|" + " --- |" * (2 + 2 * len(accs))]
  by = {(r.family, r.stage, r.accelerator): r for r in rows}
  for fam in dict.fromkeys(r.family for r in rows):
    for stage in STAGES:
      cells = []
      for acc in accs:
        r = by[(fam, stage, acc)]
        cells += [f"{r.memory_gb_per_device:.1f} GB ({r.memory_where})", _fmt_s(r.seconds)]
      lines.append(f"| {fam} | {stage} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(families: str, as_json: bool) -> int:
  names = tuple(n.strip() for n in families.split(",") if n.strip())
  unknown = [n for n in names if n not in FAMILIES]
  if unknown:
    raise SystemExit(f"--families: unknown {unknown}; choose from {list(FAMILIES)}")
  a = Assumptions()
  rows = estimates(names, ACCELERATORS, a)
  if as_json:
    for r in rows:
      print(json.dumps(r.to_json()))
  else:
    print(table(rows))
    print()
    print("Planner estimates, not measurements. Assumptions: "
          + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(a).items()))
    for r in rows[:6]:
      print(f"  {r.stage}: {r.workload}")
  return 0
