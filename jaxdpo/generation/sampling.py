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


def run_generation(model, tok, items, *, params: SamplingParams, batch_size: int, max_prompt_length: int,
                   num_samples: int = 1, seed: int = 0, degen_cfg=None, desc: str = "generate",
                   progress: bool = True, vision=None, mesh=None) -> list[dict]:
  """Generates `num_samples` completions per item; returns one JSON-able dict per sample.

  Every batch is left-padded to `max_prompt_length` and has `batch_size` rows (the last one
  padded with copies), so the whole run uses one compiled program. With `vision` (a
  `multimodal.VisionAdapter`), each row carries its record's images within the adapter's
  budget (fixed here from `items` unless already fixed). With `mesh`, each batch is split over
  its data axes and the outputs gathered (`jaxdpo.generation.distributed`); every process must
  pass the same `items`.
  """
  if vision is not None and vision.budget is None:
    vision = vision.with_budget([seq for _, seq in items])
  degen_cfg = degen_cfg or degeneration.DegenerationConfig()
  pad_id = tokenize.pad_token_id(tok)
  eos = tok.eos_token_id
  jobs = [(i, s) for i in range(len(items)) for s in range(num_samples)]
  out = []
  key = jax.random.key(seed)
  bar = tqdm(total=len(jobs), desc=desc, disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  for batch_id, start in enumerate(range(0, len(jobs), batch_size)):
    chunk = jobs[start:start + batch_size]
    n = len(chunk)
    rows = chunk + [chunk[-1]] * (batch_size - n)
    inputs = pipeline.collate_generation([items[i][1] for i, _ in rows], length=max_prompt_length, pad_id=pad_id,
                                         vision=vision)
    if vision is not None:
      inputs = vision.family.model_inputs(inputs, 1)  # the family's layout (M-RoPE positions, image bookkeeping)
    t0 = time.perf_counter()
    res = mesh_generation.generate(generate.generate, model, inputs, mesh=mesh,
                                   max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=pad_id,
                                   rng=jax.random.fold_in(key, batch_id), temperature=params.temperature,
                                   top_p=params.top_p, top_k=params.top_k, vocab_limit=len(tok))
    seconds = time.perf_counter() - t0
    verdicts = degeneration.detect_generation(res.tokens, res.num_generated, res.hit_limit, degen_cfg)
    for row, (i, s) in enumerate(chunk):
      rec = items[i][0]
      ng = int(res.num_generated[row])
      toks = [int(t) for t in res.tokens[row, :ng]]
      v = verdicts[row]
      out.append({
          "where": rec.where, "index": i, "sample": s, "prompt": rec.fields["prompt"],
          "reference": rec.fields.get("reference"),
          "hypothesis": tok.decode(toks, skip_special_tokens=True),
          "tokens": toks, "num_generated": ng, "hit_limit": bool(res.hit_limit[row]),
          "is_degenerate": v.is_degenerate, "is_early_loop": v.is_early_loop, "loop_period": v.period,
          "batch_id": batch_id, "batch_wall_time_s": seconds,
          **({"images": list(items[i][1].images)} if items[i][1].images else {}),
      })
    bar.update(n)
  bar.close()
  return out
