"""`config.job = "sft"`: completion-only fine-tuning on {"prompt", "completion", "images"?} records."""

from __future__ import annotations

import jax
from tqdm.auto import tqdm

from jaxdpo.parallel import distributed
from jaxdpo.errors import ConfigError
from jaxdpo.jobs import common, model_setup
from jaxdpo.jobs import validate
from jaxdpo.train import optim
from jaxdpo.train import loop as train
from jaxdpo.train import update
from jaxdpo.parallel import sharding as shd
from jaxdpo.data import pipeline, records, tokenize
from jaxdpo.data.vision import adapters as multimodal
from jaxdpo.models import lora as lora_lib
from jaxdpo.objectives import sft_step


def tokenize_sft(source: str, tok, config, *, desc: str, vision=None) -> list[tokenize.TokenizedSeq]:
  """Loads, validates and tokenizes every SFT record before training (images measured through
  `vision`, the family's `multimodal.VisionAdapter`)."""
  d = config.data
  rows = records.load_rows(source, d.split)
  recs = [records.validate_completion(w, r) for w, r in rows]
  base_dir = multimodal.base_dir_of(source)
  return [tokenize.tokenize_completion(tok, r, max_length=d.max_length, truncation=d.truncation,
                                       max_prompt_length=d.max_prompt_length or None,
                                       use_chat_template=d.use_chat_template,
                                       images=multimodal.record_images(vision, r, base_dir))
          for r in tqdm(recs, desc=f"tokenize {desc}", disable=not config.train.progress or jax.process_index())]


def run(config, workdir: str) -> dict:
  """Runs SFT; exports the final model to `workdir/model`.

  Like the DPO job, it scores `data.eval` (mean NLL per token, every `train.eval_every` steps
  and at the end) and logs the degeneration rate on `data.degeneration_eval`.
  """
  if config.train.get("stacked_params", "off") == "on":
    # The stacked train state is built for the DPO job; "auto" keeps SFT's state per layer.
    raise ConfigError("config.train.stacked_params='on': the stacked train state is built for the DPO job only; "
                      "SFT keeps its state per layer (use 'auto' or 'off')")
  if config.train.device_memory_gb != 0:
    # The memory planner models the DPO step only; accepting a budget it never checks would mislead.
    raise ConfigError(f"config.train.device_memory_gb={config.train.device_memory_gb}: the memory plan is made for "
                      "the dpo job only; leave it at 0 for sft")
  rules = model_setup.parse_rules(config.sharding_rules)
  mesh = shd.make_mesh(config.mesh)
  shd.check_batch(config.train.batch_size, mesh, rules)
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  examples = tokenize_sft(config.data.train, tok, config, desc="train", vision=vision)
  validate.check_dataset_size(len(examples), config.train.batch_size, config.data.train)
  eval_examples = (tokenize_sft(config.data.eval, tok, config, desc="eval", vision=vision)
                   if config.data.eval else [])
  degen_vision = vision
  if vision is not None:  # one static image budget for train and eval batches
    vision = vision.with_budget(examples, eval_examples)
  bundle = model_setup.setup_model(config.model, mesh, rules, seed=config.seed,
                                   lora_cfg=lora_lib.from_config(config.lora))
  common.check_vocab(tok, bundle.config, config.data.tokenizer)
  window = common.completion_window(config, [len(e.completion) for e in examples + eval_examples])
  scfg = sft_step.SFTStepConfig(**common.compute_settings(config, bundle.family), completion_window=window)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  mask = model_setup.trainable_mask(config.model, bundle)
  state = train.init_state(bundle, tx, mesh, mask)
  step_fn = update.make_train_step(sft_step.objective(bundle.graphdef, scfg), tx, mesh,
                                   jax.tree.map(lambda x: x.sharding, state), None, schedule, grad_accum=scfg.grad_accum,
                                   debug_nonfinite_step=config.train.debug_nonfinite_step, trainable_mask=mask)
  pad_id = tokenize.pad_token_id(tok)
  collate = common.window_checked(
      lambda b: pipeline.collate_seqs(b, max_length=config.data.max_length, pad_id=pad_id, vision=vision),
      window, "sft batch")
  # As in the DPO job: every host walks the same global order and collates only its own rows,
  # so the trajectory does not depend on the number of hosts.
  rows = distributed.host_rows(mesh, config.train.batch_size)
  iterator = pipeline.make_iterator(examples, batch_size=config.train.batch_size, collate=collate,
                                    seed=config.seed, shuffle=config.data.shuffle, host_rows=rows)
  eval_fn = None
  if eval_examples:
    eval_step = update.make_eval_step(sft_step.objective(bundle.graphdef, scfg), mesh, bundle.param_shardings, None,
                                      grad_accum=scfg.grad_accum)
    eval_fn = common.held_out_eval_fn(config, eval_step, eval_examples, collate, mesh, rows)
  spec = train.LoopSpec(step_fn=step_fn, state=state, ref=None, iterator=iterator, eval_fn=eval_fn, desc="sft",
                        degeneration_fn=common.degeneration_eval_fn(config, tok, bundle, degen_vision))
  return common.train_and_finish(config, workdir, mesh, spec, bundle)
