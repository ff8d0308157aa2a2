"""Pieces the jobs share: checks and settings read from the ConfigDict."""

from __future__ import annotations

import logging
import os

import jax

from jaxdpo.data import records
from jaxdpo.errors import ConfigError
from jaxdpo.data.vision import adapters
from jaxdpo.jobs import model_setup, summary
from jaxdpo.models import decoder, registry
from jaxdpo.train import loop as train


def check_vocab(tok, model_cfg, where: str):
  """Refuses a tokenizer with ids beyond the model's embedding table (they would index garbage)."""
  vocab = getattr(model_cfg, "vocab_size", None) or getattr(getattr(model_cfg, "text", None), "vocab_size", None)
  if vocab is not None and len(tok) > vocab:
    raise records.DataError(f"{where}: tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}")


def compute_settings(config, family: registry.Family) -> dict:
  """The step settings every objective takes: compute dtype, micro-batches, log-prob chunk, the
  family's batch layout (`Family.model_inputs`) and the block plan (`train.remat`, `train.scan_layers`)."""
  return dict(compute_dtype=model_setup.dtype_of(config.model.compute_dtype), grad_accum=config.train.grad_accum,
              logprob_chunk=config.train.logprob_chunk, model_inputs=family.model_inputs,
              blocks=block_plan(config))


def block_plan(config) -> decoder.BlockPlan:
  """The decoder blocks' remat policy and layer scan named by `config.train`."""
  return decoder.BlockPlan(remat=config.train.remat, scan=bool(config.train.scan_layers))


def params_stacked(config, bundle, trainable_mask) -> bool:
  """`train.stacked_params`: whether the DPO train state holds the scanned layers stacked.

  auto: with `train.scan_layers`, unless LoRA or a `model.trainable` mask is set (their per-path
  logic reads per-layer leaves; those runs keep the per-layer state). "on" with either is refused.
  """
  flag = config.train.get("stacked_params", "off")
  blocker = ("LoRA (config.lora.rank > 0)" if bundle.lora is not None else
             f"config.model.trainable={config.model.trainable!r}" if trainable_mask is not None else None)
  if flag == "on" and blocker:
    raise ConfigError(f"config.train.stacked_params='on' is not built with {blocker}; use 'auto' (per-layer state "
                      "for such runs) or 'off'")
  return flag == "on" or (flag == "auto" and bool(config.train.scan_layers) and blocker is None)


def completion_window(config, completion_lengths) -> int:
  """The step's static LM-head window (`logprobs.window_for`): the longest completion of the
  run's tokenized data (train and eval), so one compile serves every batch."""
  from jaxdpo.objectives import logprobs
  return logprobs.window_for(max(completion_lengths, default=1), config.data.max_length)


def window_checked(collate, window: int, where: str):
  """`collate`, then the batch's completion spans checked against the window (`logprobs.check_window`):
  a completion the step would cut is refused by name instead."""
  from jaxdpo.objectives import logprobs

  def fn(items):
    batch = collate(items)
    logprobs.check_window(batch["loss_mask"], window, where)
    return batch
  return fn


def vision_adapter(config, tok) -> adapters.VisionAdapter | None:
  """The image adapter of `config.model`'s family (None for text-only families)."""
  family, model_cfg = model_setup.resolve_model(config.model)
  d = config.data
  return adapters.adapter_for(family, model_cfg, tok, d.tokenizer, adapters.Budget(int(d.max_images),
                                                                                   int(d.max_patches)))


def held_out_eval_fn(config, eval_step, examples, collate, mesh, rows, ref=None):
  """(params) -> {"eval/<metric>": mean over up to `train.eval_batches` batches of `examples`}."""
  from jaxdpo.data import pipeline
  from jaxdpo.parallel import sharding as shd

  def fn(params):
    it = pipeline.make_iterator(examples, batch_size=config.train.batch_size, collate=collate, seed=0,
                                shuffle=False, num_epochs=1, host_rows=rows)
    sums, n = {}, 0
    for batch, _ in zip(it, range(config.train.eval_batches)):
      m = jax.device_get(eval_step(params, ref, shd.put_batch(batch, mesh)))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      n += 1
    return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}
  return fn


def degeneration_eval_fn(config, tok, bundle, vision=None):
  """(params) -> {"eval/degeneration_rate", ...} on `data.degeneration_eval`, or None when not configured."""
  if not config.data.degeneration_eval or config.train.degeneration_eval_every <= 0:
    return None
  from flax import nnx
  from jaxdpo.generation import degeneration
  from jaxdpo.generation import sampling as sampling_run
  items = sampling_run.load_prompts(config.data.degeneration_eval, tok, prompt_config(config), vision)
  g = config.generate

  def fn(params):
    model = nnx.merge(bundle.graphdef, params)
    rows = sampling_run.run_generation(
        model, tok, items, params=sampling_run.SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k),
        batch_size=g.batch_size, max_prompt_length=g.max_prompt_length, seed=config.seed,
        degen_cfg=degeneration_config(config), progress=False, vision=vision, decoding=decoding_options(config))
    r = degeneration.rates(_VerdictView(row) for row in rows)
    return {"eval/degeneration_rate": r["degeneration_rate"], "eval/early_loop_rate": r["early_loop_rate"],
            "eval/hit_limit_rate": r["hit_limit_rate"]}
  return fn


class _VerdictView:
  """Adapts a generation row to the attributes `degeneration.rates` reads."""

  def __init__(self, row):
    self.is_degenerate = row["is_degenerate"]
    self.is_early_loop = row["is_early_loop"]
    self.hit_limit = row["hit_limit"]


def decoding_options(config):
  """How generation drives its batch (`generate.refill`, `generate.stop_on_loop`, `generate.stop_on_loop_check`,
  `generate.stop_on_loop_min_run`).

  Raises:
    ConfigError: naming `generate.stop_on_loop_min_run` when it is not an int >= 0.
  """
  from jaxdpo.generation import degeneration, sampling
  g = config.generate
  min_run = g.get("stop_on_loop_min_run", 0)
  if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 0:
    raise ConfigError(f"generate.stop_on_loop_min_run must be an int >= 0 (tokens a loop must cover before its row "
                      f"is cut; 0 = two tail windows), got {min_run!r}")
  min_run = min_run or None
  if g.stop_on_loop:
    confirm = degeneration.confirm_run(degeneration_config(config), g.max_new_tokens, min_run)
    if confirm >= g.max_new_tokens:
      # Not an error: the run is then exactly the full-length one, which is what a user asking for the
      # default on a short budget should get; the warning says why nothing was cut.
      logging.getLogger("jaxdpo").warning(
          "generate.stop_on_loop: a loop must cover %d tokens before its row is cut "
          "(generate.stop_on_loop_min_run, default two degeneration.tail_window), which is not below "
          "generate.max_new_tokens=%d: no row will be cut short", confirm, g.max_new_tokens)
  return sampling.DecodingOptions(refill=bool(g.refill), stop_on_loop=bool(g.stop_on_loop),
                                  stop_on_loop_check=bool(g.stop_on_loop_check), stop_min_run=min_run)


def prompt_config(config):
  """How the generation jobs read and tokenize prompt records (`data.*`, `generate.max_prompt_length`)."""
  from jaxdpo.generation import sampling
  d = config.data
  return sampling.PromptConfig(split=d.split, max_prompt_length=config.generate.max_prompt_length,
                               truncation=d.truncation, use_chat_template=d.use_chat_template)


def degeneration_config(config):
  """The detector's settings (`config.degeneration.*`)."""
  from jaxdpo.generation import degeneration
  d = config.degeneration
  return degeneration.DegenerationConfig(min_period=d.min_period, max_period=d.max_period, min_repeats=d.min_repeats,
                                         tail_window=d.tail_window, min_tail_coverage=d.min_tail_coverage)


def train_and_finish(config, workdir: str, mesh, spec, bundle):
  """Runs the training loop, exports the model once `num_steps` is reached, and writes the summary.

  Returns the last logged metrics. A run stopped early (interrupt, non-finite guard) writes its summary
  without exporting, so that an unfinished model is never taken for the result.
  """
  last = train.run_loop(config, workdir, mesh, spec)
  model_dir = None
  if int(jax.device_get(spec.state["step"])) >= config.train.num_steps:
    params = spec.state["params"]
    if isinstance(params, decoder.StackedParams):  # `train.stacked_params`: exported per layer, as checkpoints are
      params = params.full()
    params = model_setup.export_params(bundle, params)  # LoRA: adapters merged in
    model_dir = train.export_final_model(workdir, config, bundle, params)
    if bundle.lora is not None:  # the PEFT adapter too (text and VLM families)
      model_setup.export_peft(os.path.join(workdir, "peft"), bundle, spec.state["params"],
                              base_model=config.model.checkpoint)
  summary.write(config, workdir, spec.outcome, last, model_dir)
  return last
