"""`config.job = "eval"`: generate for every record, detect degeneration, summarise.

Outputs (in the workdir):
  generations.jsonl   one object per record: prompt, reference, hypothesis, tokens,
                      num_generated, hit_limit, is_degenerate, is_early_loop, loop_period, ...
  eval_summary.json   degeneration rate with a 95% Wilson interval, n, CER/WER (jiwer),
                      generated-token stats, the share of wall time spent on degenerate outputs.

Generation runs on `config.mesh` (parameters sharded as in training, each batch split over the
data axes; across hosts each one decodes its share) and is resumable: rows are saved in chunks
(`jaxdpo.jobs.outputs`), so an interrupted eval re-run in the same workdir continues where it
stopped.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from jaxdpo.generation import eval_stats
from jaxdpo.jobs import common, jsonio, outputs
from jaxdpo.jobs import model_setup
from jaxdpo.generation import sampling as sampling_run
from jaxdpo.parallel import sharding as shd
from jaxdpo.data import tokenize
from jaxdpo.errors import ConfigError


def load_generation_model(config):
  """(bundle, model, mesh): the model for generation, from `model.checkpoint` (e.g. a training
  job's `DIR/model`), its parameters sharded on `config.mesh` as in training."""
  rules = model_setup.parse_rules(config.sharding_rules)
  mesh = shd.make_mesh(config.mesh)
  bundle = model_setup.setup_model(config.model, mesh, rules, seed=config.seed)
  return bundle, nnx.merge(bundle.graphdef, bundle.params), mesh


def summary_for(rows, config) -> dict:
  summary = eval_stats.summarize(rows)
  summary["degeneration_config"] = dataclasses.asdict(common.degeneration_config(config))
  summary["generate"] = config.generate.to_dict()
  summary["model"] = config.model.checkpoint or f"{config.model.family}:{config.model.preset} (random init)"
  return summary


def run(config, workdir: str) -> dict:
  """Runs the eval job; returns the summary."""
  if not config.data.prompts:
    raise ConfigError("config.data.prompts is empty: the eval job needs {prompt, reference?} records")
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  items = sampling_run.load_prompts(config.data.prompts, tok, common.prompt_config(config), vision)
  bundle, model, mesh = load_generation_model(config)
  vocab_warning = sampling_run.warn_vocab_mismatch(tok, bundle.config, config.data.tokenizer)
  g = config.generate
  if vision is not None and vision.budget is None:
    vision = vision.with_budget([seq for _, seq in items])  # one image budget for every chunk

  def generate_chunk(chunk_items, seed):
    return sampling_run.run_generation(
        model, tok, chunk_items, params=sampling_run.SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k),
        batch_size=g.batch_size, max_prompt_length=g.max_prompt_length, seed=seed,
        degen_cfg=common.degeneration_config(config), desc="eval", progress=config.train.progress,
        vision=vision, mesh=mesh,
        decoding=common.decoding_options(config))

  rows, store = outputs.generate_resumable(config, workdir, "eval", items, generate_chunk)
  summary = summary_for(rows, config)
  if vocab_warning:
    summary["vocab_warning"] = vocab_warning
  if jax.process_index() == 0:
    jsonio.write_jsonl(os.path.join(workdir, "generations.jsonl"), rows)
    jsonio.write_json(os.path.join(workdir, "eval_summary.json"), summary)
  store.remove()
  if jax.process_index() == 0:
    print(f"degeneration rate {summary['degeneration_rate']:.4f} "
          f"(95% CI {summary['degeneration_rate_ci95'][0]:.4f}-{summary['degeneration_rate_ci95'][1]:.4f}, "
          f"n={summary['n']}), CER {summary['cer']}, WER {summary['wer']}")
  return summary
