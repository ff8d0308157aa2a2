"""Generation over a dataset of prompts, with degeneration verdicts: the engine of eval and mine."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdpo.generation import degeneration
from jaxdpo.generation import decode as generate
from jaxdpo.generation import distributed as mesh_generation
from jaxdpo.data import pipeline, records, tokenize
from jaxdpo.data.vision import adapters as multimodal

log = logging.getLogger("jaxdpo")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """How prompt records are read and tokenized for generation (the jobs build it from the config)."""

  split: str = "train"
  max_prompt_length: int = 256
  truncation: str = "keep_end"
  use_chat_template: bool = True


def load_prompts(source: str, tok, pcfg: PromptConfig,
                 vision=None) -> list[tuple[records.Record, tokenize.TokenizedSeq]]:
  """Validated and tokenized {"prompt", "reference"?, "images"?} records.

  `vision`: the model family's `multimodal.VisionAdapter` (None for text models, which then
  refuse records with images).
  """
  out = []
  base_dir = multimodal.base_dir_of(source)
  for where, row in records.load_rows(source, pcfg.split):
    rec = records.validate_completion(where, row, completion_field="reference", require_completion=False)
    out.append((rec, tokenize.tokenize_prompt(tok, rec, max_prompt_length=pcfg.max_prompt_length,
                                              truncation=pcfg.truncation, use_chat_template=pcfg.use_chat_template,
                                              images=multimodal.record_images(vision, rec, base_dir))))
  if not out:
    raise records.DataError(f"{source}: no records")
  return out


def model_vocab_size(model_cfg) -> int | None:
  """Rows of the model's embedding table (text decoder of a vision-language model), if known."""
  text = getattr(model_cfg, "text", None)
  return getattr(model_cfg, "vocab_size", None) or getattr(text, "vocab_size", None)


def warn_vocab_mismatch(tok, model_cfg, tokenizer_dir: str) -> str | None:
  """Logs (and returns) a warning when the tokenizer and the model's vocabulary differ in size.

  Generation masks the rows past the tokenizer (`vocab_limit`), so nothing unreadable is sampled;
  the warning says so, because a mismatch usually means the wrong tokenizer or preset.
  """
  vocab = model_vocab_size(model_cfg)
  if vocab is None or vocab == len(tok):
    return None
  msg = (f"tokenizer {tokenizer_dir!r} has {len(tok)} tokens but the model's vocabulary has {vocab} rows; "
         + (f"generation never emits ids >= {len(tok)} (masked)" if vocab > len(tok) else
            "the tokenizer has ids the model cannot embed (wrong tokenizer or preset?)"))
  log.warning(msg)
  return msg


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
  """How the batch is driven (`generate.refill`, `generate.stop_on_loop`, `generate.stop_on_loop_check`).

  Attributes:
    refill: continuous batching: a finished row takes the next prompt (`decode.generate_refill`).
      Greedy outputs per record are those of static batching. Applied to greedy decoding on one
      device only: sampled draws would change (per-prompt keys), and a mesh of several devices
      keeps static batches (not built yet). False = static batches of `batch_size` records that
      each wait for their slowest row.
    stop_on_loop: a row whose tail is a confirmed exact loop stops and is recorded as
      `degenerate_early` with the tokens so far (and counts as degenerate).
    stop_on_loop_check: with `stop_on_loop`, also generate every record to full length, so that
      each record carries the study's full-length verdict (`degenerate_full`) next to the early
      one and the eval summary can report how they agree. Costs the full-length run.
    stop_min_run: with `stop_on_loop`, tokens the loop must cover before the row is cut
      (`generate.stop_on_loop_min_run`); None = `degeneration.default_min_run` (two tail windows).
  """

  refill: bool = True
  stop_on_loop: bool = False
  stop_on_loop_check: bool = False
  stop_min_run: int | None = None


def run_generation(model, tok, items, *, params: SamplingParams, batch_size: int, max_prompt_length: int,
                   num_samples: int = 1, seed: int = 0, degen_cfg=None, desc: str = "generate",
                   progress: bool = True, vision=None, mesh=None,
                   decoding: DecodingOptions | None = None) -> list[dict]:
  """Generates `num_samples` completions per item; returns one JSON-able dict per sample, in
  (item, sample) order.

  Every prompt is left-padded to `max_prompt_length` and the batch has `batch_size` rows, so
  the whole run uses a fixed set of compiled programs. With `vision` (a
  `multimodal.VisionAdapter`), each row carries its record's images within the adapter's
  budget (fixed here from `items` unless already fixed). With `mesh`, each batch is split over
  its data axes and the outputs gathered (`jaxdpo.generation.distributed`); every process must
  pass the same `items`. `decoding` (default: refill on, no early stop) chooses static batches
  or row refill, and the early stop on loops. Row refill applies to greedy decoding on one
  device; sampled runs, and meshes of more than one device, use static batches.
  """
  if vision is not None and vision.budget is None:
    vision = vision.with_budget([seq for _, seq in items])
  degen_cfg = degen_cfg or degeneration.DegenerationConfig()
  decoding = decoding or DecodingOptions()
  pad_id = tokenize.pad_token_id(tok)
  jobs = [(i, s) for i in range(len(items)) for s in range(num_samples)]

  def make_inputs(job_ids):
    inputs = pipeline.collate_generation([items[jobs[j][0]][1] for j in job_ids], length=max_prompt_length,
                                         pad_id=pad_id, vision=vision)
    if vision is not None:
      inputs = vision.family.model_inputs(inputs, 1)  # the family's layout (M-RoPE positions, image bookkeeping)
    return inputs

  kw = dict(params=params, batch_size=batch_size, max_prompt_length=max_prompt_length, seed=seed, desc=desc,
            progress=progress, tok=tok, pad_id=pad_id, mesh=mesh, min_run=decoding.stop_min_run)
  stop = degen_cfg if decoding.stop_on_loop else None
  # Refill is exact for greedy decoding only; sampled runs keep static batches (and their draws, which
  # the mesh path reproduces on any number of hosts). On more than one device: static (not built yet).
  refill = decoding.refill and params.temperature == 0.0 and (mesh is None or mesh.size == 1)
  drive = _refill if refill else _static
  results = drive(model, jobs, make_inputs, stop=stop, **kw)
  full = None
  if decoding.stop_on_loop and decoding.stop_on_loop_check:
    full = drive(model, jobs, make_inputs, stop=None, **dict(kw, desc=desc + " (full length)"))
  out = []
  for j, (i, s) in enumerate(jobs):
    res = results[j]
    rec = items[i][0]
    ng = res["num_generated"]
    toks = res["tokens"]
    v = _verdict(toks, res["hit_limit"], res["stopped_on_loop"], degen_cfg)
    row = {
        "where": rec.where, "index": i, "sample": s, "prompt": rec.fields["prompt"],
        "reference": rec.fields.get("reference"),
        "hypothesis": tok.decode(toks, skip_special_tokens=True),
        "tokens": toks, "num_generated": ng, "hit_limit": res["hit_limit"],
        "is_degenerate": v.is_degenerate, "is_early_loop": v.is_early_loop, "loop_period": v.period,
        **res["timing"],
        **({"images": list(items[i][1].images)} if items[i][1].images else {}),
    }
    if decoding.stop_on_loop:
      row["degenerate_early"] = res["stopped_on_loop"]
    if full is not None:
      f = full[j]
      fv = _verdict(f["tokens"], f["hit_limit"], False, degen_cfg)
      row.update(degenerate_full=fv.is_degenerate, num_generated_full=f["num_generated"])
    out.append(row)
  return out


def _verdict(tokens, hit_limit: bool, stopped_on_loop: bool, cfg) -> degeneration.Verdict:
  """The record's verdict: a row cut short on a loop counts as degenerate (the early classification).

  A row that ended with EOS is inspected without it (`generate` counts the EOS token).
  """
  if stopped_on_loop:
    return degeneration.detect(tokens, True, cfg)
  return degeneration.detect(tokens if hit_limit else tokens[:max(len(tokens) - 1, 0)], hit_limit, cfg)


def _static(model, jobs, make_inputs, *, params, batch_size, max_prompt_length, seed, desc, progress, tok, pad_id,
            stop, mesh, min_run):
  """Static batches of `batch_size` jobs (the last padded with copies); each waits for its slowest row."""
  key = jax.random.key(seed)
  results = []
  bar = tqdm(total=len(jobs), desc=desc, disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  for batch_id, start in enumerate(range(0, len(jobs), batch_size)):
    ids = list(range(start, min(start + batch_size, len(jobs))))
    n = len(ids)
    inputs = make_inputs(ids + ids[-1:] * (batch_size - n))
    t0 = time.perf_counter()
    res = mesh_generation.generate(generate.generate, model, inputs, mesh=mesh,
                                   max_new_tokens=params.max_new_tokens, eos_token_id=tok.eos_token_id,
                                   pad_token_id=pad_id, rng=jax.random.fold_in(key, batch_id),
                                   temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                   vocab_limit=len(tok), stop_on_loop=stop, stop_min_run=min_run)
    seconds = time.perf_counter() - t0
    for row in range(n):
      ng = int(res.num_generated[row])
      results.append({"tokens": [int(t) for t in res.tokens[row, :ng]], "num_generated": ng,
                      "hit_limit": bool(res.hit_limit[row]), "stopped_on_loop": bool(res.stopped_on_loop[row]),
                      "timing": {"batch_id": batch_id, "batch_wall_time_s": seconds}})
    bar.update(n)
  bar.close()
  return results


def _refill(model, jobs, make_inputs, *, params, batch_size, max_prompt_length, seed, desc, progress, tok, pad_id,
            stop, mesh, min_run):
  """Row refill over all jobs (`decode.generate_refill`); a job's sample key is fold_in(seed key, job id)."""
  t0 = time.perf_counter()
  bar = tqdm(total=len(jobs), desc=desc, disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  res = generate.generate_refill(model, len(jobs), make_inputs, batch_size=batch_size, prompt_length=max_prompt_length,
                                 max_new_tokens=params.max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=pad_id, rng=jax.random.key(seed), temperature=params.temperature,
                                 top_p=params.top_p, top_k=params.top_k, vocab_limit=len(tok), stop_on_loop=stop,
                                 stop_min_run=min_run,
                                 on_finished=bar.update)
  bar.close()
  log.info("%s: %d jobs in %.1fs with row refill (%s)", desc, len(jobs), time.perf_counter() - t0, res.stats)
  results = []
  for j in range(len(jobs)):
    ng = int(res.num_generated[j])
    results.append({"tokens": [int(t) for t in res.tokens[j, :ng]], "num_generated": ng,
                    "hit_limit": bool(res.hit_limit[j]), "stopped_on_loop": bool(res.stopped_on_loop[j]),
                    "timing": {"wall_time_s": float(res.slot_seconds[j])}})
  return results
