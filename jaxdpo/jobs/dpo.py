"""`config.job = "dpo"`: data -> tokenized pairs -> sharded DPO steps -> checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdpo.parallel import distributed
from jaxdpo.parallel import memory
from jaxdpo.models import decoder
from jaxdpo.models import lora as lora_lib
from jaxdpo.models import trainable as trainable_lib
from jaxdpo.jobs import common, model_setup, ref_cache
from jaxdpo.jobs import validate
from jaxdpo.train import optim, stacked_state
from jaxdpo.train import loop as train
from jaxdpo.train import update
from jaxdpo.parallel import sharding as shd
from jaxdpo.data import pipeline, records, shared_rows, skipping, tokenize
from jaxdpo.data.vision import adapters as multimodal
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.errors import ConfigError

log = logging.getLogger("jaxdpo")


def loss_config(config) -> losses.DPOLossConfig:
  d = config.dpo
  return losses.DPOLossConfig(loss_type=d.loss_type, beta=d.beta, label_smoothing=d.label_smoothing,
                              rpo_alpha=d.rpo_alpha, reference_free=d.reference_free, loss_weights=d.loss_weights,
                              ld_alpha=d.ld_alpha, f_divergence_type=d.f_divergence_type,
                              f_alpha_divergence_coef=d.f_alpha_divergence_coef, discopop_tau=d.discopop_tau)


def step_config(config, family) -> step_lib.StepConfig:
  """The DPO step's static settings (the soft cap comes from the model itself)."""
  return step_lib.StepConfig(loss=loss_config(config), **common.compute_settings(config, family),
                             lora_reference=lora_reference(config))


def lora_reference(config) -> bool:
  """True when the reference is the LoRA policy with its adapters off (no reference copy is held)."""
  return (config.lora.rank > 0 and not config.dpo.reference_free and config.dpo.reference == "model")


def memory_run(config) -> memory.DPORun:
  """What the memory planner needs to know about `config`'s DPO run."""
  family, model_cfg = model_setup.resolve_model(config.model)
  compute = model_setup.dtype_of(config.model.compute_dtype)
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  lora_cfg = lora_lib.from_config(config.lora) if config.lora.rank > 0 else None
  base = model_setup.dtype_of(model_setup.base_dtype(config.model, lora_cfg))
  return memory.DPORun(family=family, model_cfg=model_cfg, param_dtype=base,
                       compute_dtype=compute, attention_impl=model_setup.attention_impl(config.model.attention_impl,
                                                                                         compute),
                       tx=tx, reference_model=(not config.dpo.reference_free and config.dpo.reference == "model"
                                                        and not lora_reference(config)),
                       batch_size=config.train.batch_size, grad_accum=config.train.grad_accum,
                       seq_len=config.data.max_length, logprob_chunk=config.train.logprob_chunk,
                       trainable=trainable_lib.predicate(config.model.trainable, family),
                       lora=lora_cfg, remat=config.train.remat, scan_layers=bool(config.train.scan_layers))


def tokenize_preferences(source: str, tok, config, *, desc: str, vision=None,
                         skips: skipping.SkipLog | None = None) -> list[tokenize.TokenizedPair]:
  """Loads, validates and tokenizes every record up front: bad input stops the job before training.

  `vision`: the family's `multimodal.VisionAdapter`, which opens and measures each pair's images.
  `skips`: with `data.skip_bad_records`, bad records are recorded there and left out instead.
  """
  skips = skips or skipping.SkipLog()
  recs = records.load_preferences(source, config.data.split, skips)
  dcfg = config.data
  base_dir = multimodal.base_dir_of(source)
  out = []
  for r in tqdm(recs, desc=f"tokenize {desc}", disable=not config.train.progress or jax.process_index() != 0):
    pair = skips.attempt(r.where, lambda r=r: tokenize.tokenize_preference(
        tok, r, max_length=dcfg.max_length, truncation=dcfg.truncation,
        max_prompt_length=dcfg.max_prompt_length or None, use_chat_template=dcfg.use_chat_template,
        images=multimodal.record_images(vision, r, base_dir)))
    if pair is not None:
      out.append(pair)
  return out


def tokenize_checked(source: str, tok, config, workdir: str, skips: skipping.SkipLog, *, desc: str, vision=None):
  """`tokenize_preferences`, then the skip list written and its share checked (`data.max_skip_share`)."""
  start = len(skips.entries)
  out = tokenize_preferences(source, tok, config, desc=desc, vision=vision, skips=skips)
  if skips.enabled:
    listed = os.path.join(os.path.abspath(workdir), skipping.FILE_NAME)
    if jax.process_index() == 0:
      skipping.write(skips, workdir)
    bad = len(skips.entries) - start
    if bad:
      log.warning("%s: skipped %d bad record(s) (data.skip_bad_records), listed in %s", source, bad, listed)
    skipping.check_share(skips, source, len(out) + bad, config.data.max_skip_share, listed, start)
  return out


def reference_copy(bundle, compute_dtype):
  """The frozen reference: the initial policy cast ONCE to the compute dtype (the only dtype the step
  reads it in), in separate buffers, since the train state is donated. fp32 params with bf16 compute
  hold a half-size reference, and the step casts nothing for it."""
  cast = lambda x: x.astype(compute_dtype) if x.dtype != compute_dtype else x.copy()
  return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=bundle.param_shardings)(bundle.params)


def precompute_reference(bundle, examples, scfg, mesh, batch_size: int, collate, desc: str):
  """Reference log-probs of every pair, computed once by the initial policy (no reference in memory later)."""
  # Replicated output: every host reads all rows, even those held by other hosts' devices.
  fn = jax.jit(lambda p, b: step_lib.pair_logps(bundle.graphdef, p, b, scfg)[0], out_shardings=shd.replicated(mesh))
  rows = distributed.host_rows(mesh, batch_size)
  out = []
  for i in tqdm(range(0, len(examples), batch_size), desc=f"reference {desc}", disable=jax.process_index() != 0):
    chunk = list(examples[i:i + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # pad the last batch to the compiled shape
    logps = np.asarray(jax.device_get(fn(bundle.params, shd.put_batch(collate([chunk[r] for r in rows]), mesh))))
    out.extend(tuple(map(float, row)) for row in logps[:n])
  return [dataclasses.replace(e, ref_logps=r) for e, r in zip(examples, out)]


@dataclasses.dataclass
class Prepared:
  """What the DPO and ref_logps jobs set up alike: mesh, tokenized pairs, vision adapter, model, step."""

  mesh: object
  rules: tuple
  tok: object
  vision: object  # the adapter with the run's image budget (None for text models)
  degen_vision: object  # the adapter before the budget (degeneration evals)
  skips: skipping.SkipLog
  train_examples: list
  eval_examples: list
  plan: object
  bundle: model_setup.ModelBundle
  scfg: step_lib.StepConfig
  collate: object


def prepare(config, workdir: str, *, check_cache: bool = True) -> Prepared:
  """Mesh, data (tokenized, checked), memory plan, model and step settings, in that order.

  With `dpo.reference=cache:PATH` the cached reference log-probs are attached to the pairs right
  after tokenizing (`check_cache`), so a stale cache stops the job before any model is built.
  """
  rules = model_setup.parse_rules(config.sharding_rules)
  mesh = shd.make_mesh(config.mesh)
  shd.check_batch(config.train.batch_size, mesh, rules)
  if config.train.batch_size % config.train.grad_accum:
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by "
                     f"config.train.grad_accum={config.train.grad_accum}")
  tok = tokenize.load_tokenizer(config.data.tokenizer)
  vision = common.vision_adapter(config, tok)
  skips = skipping.SkipLog(enabled=config.data.skip_bad_records)
  train_examples = tokenize_checked(config.data.train, tok, config, workdir, skips, desc="train", vision=vision)
  validate.check_dataset_size(len(train_examples), config.train.batch_size, config.data.train, "pairs")
  eval_examples = (tokenize_checked(config.data.eval, tok, config, workdir, skips, desc="eval", vision=vision)
                   if config.data.eval else [])
  path = ref_cache.cache_path(config.dpo.reference)
  if path and check_cache and not config.dpo.reference_free:
    ckpt, settings = ref_cache.checkpoint_id(config.model, config.seed), ref_cache.settings_of(config,
                                                                                                loss_config(config))
    train_examples = ref_cache.attach(path, train_examples, ckpt, settings, config.dpo.reference)
    eval_examples = ref_cache.attach(path, eval_examples, ckpt, settings, config.dpo.reference)
  degen_vision = vision
  if vision is not None:  # one static image budget for train and eval batches (one compile each)
    vision = vision.with_budget(train_examples, eval_examples)

  # Per-device memory from shapes alone: a run that cannot fit stops before anything is allocated.
  plan = memory.report_and_check(memory.plan_dpo(memory_run(config), mesh, rules), config.train.device_memory_gb,
                                 announce=False)  # compiled_check below logs the refined plan
  bundle = model_setup.setup_model(config.model, mesh, rules, seed=config.seed,
                                   lora_cfg=lora_lib.from_config(config.lora))
  common.check_vocab(tok, bundle.config, config.data.tokenizer)
  # The LM head scores each row's completion window only: its static size covers every pair here.
  window = common.completion_window(config, [max(len(e.chosen), len(e.rejected))
                                             for e in train_examples + eval_examples])
  scfg = dataclasses.replace(step_config(config, bundle.family), completion_window=window)
  pad_id = tokenize.pad_token_id(tok)
  collate = pair_collate(config, train_examples + eval_examples, pad_id, vision, mesh, window)
  return Prepared(mesh, rules, tok, vision, degen_vision, skips, train_examples, eval_examples, plan, bundle, scfg,
                  collate)


def pair_collate(config, examples, pad_id: int, vision, mesh=None, window=None):
  """The collate of `config.data.layout`: two rows per pair, one prefix-shared row per pair sized
  once for the run's longest pair (one static shape, one compile), or with `data.pack_tokens`
  several shared pairs per packed row (shapes from a few buckets, `jaxdpo.data.packing`)."""
  max_length = config.data.max_length
  if config.data.pack_tokens:
    check_packing(config)
    row_multiple = config.train.grad_accum
    if mesh is not None:
      row_multiple *= mesh.shape["data"] * mesh.shape["fsdp"]
    return lambda b: pipeline.collate_packed(b, max_length=max_length, pad_id=pad_id,
                                             pack_tokens=config.data.pack_tokens, row_multiple=row_multiple,
                                             vision=vision)
  if config.data.layout == "shared":
    length, slots = shared_rows.shape_for(examples)
    return lambda b: pipeline.collate_shared(b, max_length=max_length, pad_id=pad_id, vision=vision, length=length,
                                             slots=slots)
  collate = lambda b: pipeline.collate_pairs(b, max_length=max_length, pad_id=pad_id, vision=vision)
  # Two rows per pair: the LM head scores a static completion window (`window`); a pair it would
  # cut is refused by name. The shared and packed layouts score explicit slots and need no window.
  return collate if window is None else common.window_checked(collate, window, "preference batch")


def check_packing(config):
  """What packing does not cover yet is refused, naming the key (not silently run another way)."""
  key = f"config.data.pack_tokens={config.data.pack_tokens}"
  if config.dpo.reference != "model" and not config.dpo.reference_free:
    raise ConfigError(f"{key}: packing with config.dpo.reference={config.dpo.reference!r} is not built (cached "
                      "log-probs are per pair, packed rows are not); use dpo.reference=model")
  if config.job == "ref_logps":
    raise ConfigError(f"{key}: job=ref_logps writes log-probs per pair; run it unpacked (data.pack_tokens=0)")
  if jax.process_count() > 1:
    raise ConfigError(f"{key}: packing on {jax.process_count()} processes is not built (each host would pack its "
                      "rows to its own shape)")
  if model_setup.attention_impl(config.model.attention_impl, model_setup.dtype_of(config.model.compute_dtype)) != "xla":
    raise ConfigError(f"{key}: packed rows need segment ids, which jax 0.10's cuDNN attention does not take; "
                      "set config.model.attention_impl=xla (or unpack: data.pack_tokens=0)")


def run(config, workdir: str) -> dict:
  """Runs the DPO job; returns the last logged metrics."""
  if config.dpo.reference not in ("model", "cached") and not ref_cache.cache_path(config.dpo.reference):
    raise ConfigError(f"config.dpo.reference={config.dpo.reference!r}; expected 'model', 'cached' or cache:PATH")
  p = prepare(config, workdir)
  mesh, bundle, scfg, collate = p.mesh, p.bundle, p.scfg, p.collate
  train_examples, eval_examples = p.train_examples, p.eval_examples
  # Every host walks the same global order and collates the rows its devices hold, so the global
  # batch does not depend on the number of processes (see pipeline.make_iterator).
  rows = distributed.host_rows(mesh, config.train.batch_size)

  ref_params = None
  if not config.dpo.reference_free and not ref_cache.cache_path(config.dpo.reference):
    if config.dpo.reference == "cached":
      train_examples = precompute_reference(bundle, train_examples, scfg, mesh, config.train.batch_size, collate,
                                            "train")
      if eval_examples:
        eval_examples = precompute_reference(bundle, eval_examples, scfg, mesh, config.train.batch_size, collate,
                                             "eval")
    elif scfg.lora_reference:
      pass  # LoRA: the step evaluates the policy with B = 0 as the reference; no copy of the base
    else:
      ref_params = reference_copy(bundle, scfg.compute_dtype)

  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  mask = model_setup.trainable_mask(config.model, bundle)
  state = train.init_state(bundle, tx, mesh, mask)
  ref_sh = None if ref_params is None else bundle.param_shardings
  disk, param_sh = None, bundle.param_shardings
  if common.params_stacked(config, bundle, mask):
    # The scanned layers held stacked from here on (bundle.params is donated); checkpoints stay per layer.
    leaves = len(jax.tree.leaves(state["params"]))
    state, disk = stacked_state.stack_state(bundle.graphdef, state)
    log.info("train state: scanned layers stacked (train.stacked_params), %d -> %d parameter leaves; checkpoints "
             "stay per layer", leaves, len(jax.tree.leaves(state["params"])))
    param_sh = jax.tree.map(lambda x: x.sharding, state["params"])
    if ref_params is not None:  # the reference stacked the same way, so params_identical compares stack by stack
      ref_params = jax.jit(lambda r: decoder.stack_params(bundle.graphdef, r),
                           out_shardings=param_sh)(ref_params)
      ref_sh = jax.tree.map(lambda x: x.sharding, ref_params)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step_fn = update.make_train_step(step_lib.objective(bundle.graphdef, scfg), tx, mesh, state_sh, ref_sh, schedule,
                                   grad_accum=scfg.grad_accum, debug_nonfinite_step=config.train.debug_nonfinite_step,
                                   trainable_mask=mask)
  sample, rows_in_step = collate(train_examples[:1]), config.train.batch_size
  if config.data.pack_tokens:  # the leading axis is packed rows: check one real first batch's shape
    sample = collate(train_examples[:config.train.batch_size])
    rows_in_step = sample["input_ids"].shape[0]
  memory.compiled_check(p.plan, step_fn, state, ref_params, sample, rows_in_step, mesh,
                        config.train.device_memory_gb)  # compiles the step once; the loop reuses it

  iterator = pipeline.make_iterator(train_examples, batch_size=config.train.batch_size, collate=collate,
                                    seed=config.seed, shuffle=config.data.shuffle, host_rows=rows)
  eval_fn = None
  if eval_examples:
    eval_step = update.make_eval_step(step_lib.objective(bundle.graphdef, scfg), mesh, param_sh, ref_sh,
                                      grad_accum=scfg.grad_accum)

    eval_fn = common.held_out_eval_fn(config, eval_step, eval_examples, collate, mesh, rows, ref_params)

  degeneration_fn = common.degeneration_eval_fn(config, p.tok, bundle, p.degen_vision)
  if disk is not None and degeneration_fn is not None:  # generation runs the per-layer model
    degeneration_fn = lambda params, fn=degeneration_fn: fn(params.full())
  spec = train.LoopSpec(step_fn=step_fn, state=state, ref=ref_params, iterator=iterator, eval_fn=eval_fn, desc="dpo",
                        degeneration_fn=degeneration_fn, disk=disk,
                        constants={"data/skipped_records": float(len(p.skips.entries))} if p.skips.enabled else {})
  return common.train_and_finish(config, workdir, mesh, spec, bundle)
