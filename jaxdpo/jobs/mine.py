"""`config.job = "mine"`: preference pairs from the model's own failures.

For every {"prompt", "reference"?, "images"?} record, sample `mine.num_samples` completions,
mark the degenerate ones, and write a pair in the DPO job's input format:
  chosen   = the reference transcription (`mine.chosen = "reference"`), or the non-degenerate
             sample with the lowest CER against the reference (`"best_sample"`);
  rejected = a degenerate sample (`mine.rejected = "degenerate"`), or, when none degenerated,
             the sample with the highest CER (`"worst_cer"`).
Each pair records `rejected_hit_limit`: a rejected sample that ran to `generate.max_new_tokens`
without EOS is tokenized without one (DPO must not learn that stopping after a loop is bad).
Outputs: `pairs.jsonl` (feed it to the dpo job as `data.train`), `samples.jsonl` (every sample
with its verdict and `hit_limit`) and `mine_summary.json` (how many records yielded a pair, and
why not; `max_pair_length`, the tokens the longest pair needs: the DPO stage's `data.max_length`
must be at least that, or its pairs get truncated).
Generation runs on `config.mesh` and is resumable as in eval (`jaxdpo.jobs.outputs`): a killed
mine re-run in the same workdir continues from its saved chunks and writes the same pairs.jsonl;
each chunk samples with its own seed, so the samples do not depend on where a run stopped.
With `mine.rejected = "degenerate"` (no fallback), 0 pairs is an error (exit 2) that says why; the
fallback `"worst_cer"` must be chosen explicitly.
"""

from __future__ import annotations

import os

import jax

from jaxdpo.jobs import evaluate as eval_job
from jaxdpo.generation import eval_stats
from jaxdpo.jobs import common, jsonio, outputs
from jaxdpo.generation import sampling as sampling_run
from jaxdpo.data import records, tokenize
from jaxdpo.data.vision import adapters as multimodal
from jaxdpo.errors import ConfigError, UserError

CHOSEN = ("reference", "best_sample")
REJECTED = ("degenerate", "worst_cer")


def _cer(ref, hyp) -> float:
  return eval_stats.cer([ref], [hyp]) if ref else float("inf")


class NoPairsError(UserError):
  """Mining without a fallback found no pair; `summary` is the mine summary (written too)."""

  def __init__(self, message: str, summary: dict):
    super().__init__(message)
    self.summary = summary


def pick_pair(samples: list[dict], reference, *, chosen_mode: str, rejected_mode: str):
  """(chosen text, rejected sample) for one record, or (None, reason) when it yields no pair."""
  degenerate = [s for s in samples if s["is_degenerate"]]
  if degenerate:
    rejected = degenerate[0]
  elif rejected_mode == "worst_cer" and reference:
    rejected = max(samples, key=lambda s: _cer(reference, s["hypothesis"]))
  else:
    return None, "no_degenerate_sample"
  if chosen_mode == "reference":
    if not reference:
      return None, "no_reference"
    chosen = reference
  else:
    clean = [s for s in samples if not s["is_degenerate"] and s is not rejected]
    if not clean or not reference:
      return None, "no_clean_sample" if reference else "no_reference"
    chosen = min(clean, key=lambda s: _cer(reference, s["hypothesis"]))["hypothesis"]
  if not rejected["hypothesis"].strip():
    return None, "empty_rejected"
  if chosen.strip() == rejected["hypothesis"].strip():
    return None, "rejected_equals_chosen"
  return (chosen, rejected), None


def pair_length(tok, pair: dict, config, vision) -> int:
  """Prompt plus longest completion, in tokens, of one mined pair as the DPO job tokenizes it."""
  rec = records.validate_preference("mined pair", pair)
  seq = tokenize.tokenize_preference(tok, rec, max_length=1 << 30, truncation="off",
                                     use_chat_template=config.data.use_chat_template,
                                     images=multimodal.record_images(vision, rec, ""))
  return len(seq.prompt) + max(len(seq.chosen), len(seq.rejected))


def run(config, workdir: str) -> dict:
  """Runs the mine job; returns the summary."""
  m = config.mine
  if m.chosen not in CHOSEN or m.rejected not in REJECTED:
    raise ConfigError(f"config.mine.chosen={m.chosen!r} (expected {CHOSEN}), config.mine.rejected={m.rejected!r} "
                     f"(expected {REJECTED})")
  if m.num_samples < 1:
    raise ConfigError(f"config.mine.num_samples must be >= 1, got {m.num_samples}")
  if not config.data.prompts:
    raise ConfigError("config.data.prompts is empty: the mine job needs {prompt, reference} records")
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  items = sampling_run.load_prompts(config.data.prompts, tok, common.prompt_config(config), vision)
  bundle, model, mesh = eval_job.load_generation_model(config)
  vocab_warning = sampling_run.warn_vocab_mismatch(tok, bundle.config, config.data.tokenizer)
  if vision is not None and vision.budget is None:
    vision = vision.with_budget([seq for _, seq in items])  # one image budget for every chunk

  def generate_chunk(chunk_items, seed):
    return sampling_run.run_generation(
        model, tok, chunk_items,
        params=sampling_run.SamplingParams(config.generate.max_new_tokens, m.temperature, m.top_p, m.top_k),
        batch_size=config.generate.batch_size, max_prompt_length=config.generate.max_prompt_length,
        num_samples=m.num_samples, seed=seed, degen_cfg=common.degeneration_config(config), desc="mine",
        progress=config.train.progress, vision=vision, mesh=mesh,
        decoding=common.decoding_options(config))

  # mine.chosen / mine.rejected only pick among the samples: they may change on resume.
  rows, store = outputs.generate_resumable(config, workdir, "mine", items, generate_chunk, num_samples=m.num_samples,
                                           extra_keys=("mine.num_samples", "mine.temperature", "mine.top_p",
                                                       "mine.top_k"))
  by_record: dict[int, list[dict]] = {}
  for r in rows:
    by_record.setdefault(r["index"], []).append(r)
  pairs, reasons = [], {}
  for i, (rec, seq) in enumerate(items):
    picked, reason = pick_pair(by_record[i], rec.fields.get("reference"), chosen_mode=m.chosen,
                               rejected_mode=m.rejected)
    if picked is None:
      reasons[reason] = reasons.get(reason, 0) + 1
      continue
    chosen, rejected = picked
    pair = {"prompt": rec.fields["prompt"], "chosen": chosen, "rejected": rejected["hypothesis"],
            "source": rec.where, "rejected_is_degenerate": rejected["is_degenerate"],
            records.REJECTED_HIT_LIMIT: bool(rejected["hit_limit"])}
    if seq.images:
      pair["images"] = list(seq.images)  # resolved paths: pairs.jsonl lives in another directory
    pairs.append(pair)
  lengths = [pair_length(tok, p, config, vision) for p in pairs]
  summary = {
      "records": len(items), "samples": len(rows), "degenerate_samples": sum(r["is_degenerate"] for r in rows),
      "records_with_degenerate_sample": sum(any(s["is_degenerate"] for s in v) for v in by_record.values()),
      "pairs": len(pairs), "records_without_pair": reasons, "chosen": m.chosen, "rejected": m.rejected,
      "pairs_rejected_degenerate": sum(p["rejected_is_degenerate"] for p in pairs),
      "pairs_rejected_hit_limit": sum(p[records.REJECTED_HIT_LIMIT] for p in pairs),
      "max_pair_length": max(lengths, default=0),
  }
  if vocab_warning:
    summary["vocab_warning"] = vocab_warning
  if not pairs and m.rejected == "degenerate":
    # An empty pairs.jsonl would only fail later, in the DPO job; keep the samples for a look.
    if jax.process_index() == 0:
      jsonio.write_jsonl(os.path.join(workdir, "samples.jsonl"), rows)
      jsonio.write_json(os.path.join(workdir, "mine_summary.json"), summary)
    store.remove()
    raise NoPairsError(
        f"mine: 0 pairs from {len(items)} records ({summary['degenerate_samples']} of {len(rows)} samples "
        f"degenerate; records without a pair: {reasons}); nothing written to pairs.jsonl. "
        f"Sample more (config.mine.num_samples, generate.max_new_tokens) or fall back to the worst sample "
        f"by CER with --config.mine.rejected=worst_cer (samples: {os.path.join(workdir, 'samples.jsonl')})",
        summary)
  if jax.process_index() == 0:
    jsonio.write_jsonl(os.path.join(workdir, "samples.jsonl"), rows)
    jsonio.write_jsonl(os.path.join(workdir, "pairs.jsonl"), pairs)
    jsonio.write_json(os.path.join(workdir, "mine_summary.json"), summary)
  store.remove()
  if jax.process_index() == 0:
    print(f"mined {len(pairs)} pairs from {len(items)} records ({summary['degenerate_samples']} degenerate samples "
          f"of {len(rows)}); the longest pair needs data.max_length >= {summary['max_pair_length']}")
  return summary
