"""The full set of config keys with their defaults; experiment files override a few.

Every key a job reads exists here, so the config can be locked: a misspelt override on the
command line (`--config.optim.lrr=1e-6`) then fails and names the key.
"""

from __future__ import annotations

import ml_collections

from jaxdpo import assets


def base() -> ml_collections.ConfigDict:
  """Defaults for every job (dpo, sft, eval, mine)."""
  c = ml_collections.ConfigDict()
  c.job = "dpo"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.family = "qwen2"          # registry name; ignored when `checkpoint` is set
  c.model.preset = "tiny"           # preset of the family, for randomly initialised models
  c.model.checkpoint = ""           # converted checkpoint dir (python -m jaxdpo.convert hf-to-jax)
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"
  c.model.attention_impl = ""       # "" = auto: cudnn on GPU, xla elsewhere

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = ""             # "" = jaxdpo.parallel.sharding.DEFAULT_RULES; else "name=axis1+axis2,name2=,..."

  c.data = ml_collections.ConfigDict()
  c.data.train = assets.path("tiny_prefs.jsonl")
  c.data.eval = ""
  c.data.split = "train"            # for hub datasets
  c.data.tokenizer = assets.path("tiny_tokenizer")
  c.data.max_length = 64
  c.data.max_prompt_length = 0      # 0 = max_length // 2 when truncating
  c.data.truncation = "keep_end"    # keep_end | keep_start | off
  c.data.use_chat_template = True
  c.data.shuffle = True
  c.data.prompts = ""               # eval / mine input: {"prompt", "reference"?, "images"?} records
  c.data.degeneration_eval = ""     # dpo/sft: prompts whose degeneration rate is logged every
                                    # train.degeneration_eval_every steps as eval/degeneration_rate
  c.data.max_images = 0             # vision models: image slots per record (pair); 0 = the most any record has
  c.data.max_patches = 0            # Qwen2.5-VL: vision patches per record (pair); 0 = the most any record needs

  c.dpo = ml_collections.ConfigDict()
  c.dpo.loss_type = "sigmoid"       # sigmoid | robust | hinge | ipo
  c.dpo.beta = 0.1
  c.dpo.label_smoothing = 0.0
  c.dpo.rpo_alpha = 0.0
  c.dpo.reference_free = False
  c.dpo.reference = "model"         # model: frozen copy of the initial policy; cached: precomputed once

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 10
  c.optim.end_lr_ratio = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.max_grad_norm = 1.0

  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 64
  c.generate.max_prompt_length = 64  # prompts are left-padded to this, so generation compiles once
  c.generate.batch_size = 8
  c.generate.temperature = 0.0       # 0 = greedy
  c.generate.top_p = 1.0
  c.generate.top_k = 0

  c.degeneration = ml_collections.ConfigDict()  # see jaxdpo.generation.degeneration.DegenerationConfig
  c.degeneration.min_period = 1
  c.degeneration.max_period = 64
  c.degeneration.min_repeats = 3
  c.degeneration.tail_window = 256
  c.degeneration.min_tail_coverage = 0.5

  c.mine = ml_collections.ConfigDict()
  c.mine.num_samples = 4             # k completions sampled per record
  c.mine.temperature = 1.0
  c.mine.top_p = 1.0
  c.mine.top_k = 0
  c.mine.chosen = "reference"        # reference | best_sample (lowest-CER non-degenerate sample)
  c.mine.rejected = "degenerate"     # degenerate | worst_cer (fallback when no sample degenerated)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100
  c.train.batch_size = 8            # global number of pairs (or sequences for sft) per optimizer step
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.ckpt_every = 50
  c.train.max_to_keep = 3
  c.train.eval_every = 0
  c.train.eval_batches = 4
  c.train.degeneration_eval_every = 0
  c.train.stop_at_step = -1         # stop (after checkpointing) at this step; -1 = run to num_steps
  c.train.logprob_chunk = 256
  c.train.tensorboard = False
  c.train.progress = True
  c.train.straggler_factor = 10.0   # warn when a step takes this many times the median; 0 = off
  c.train.device_memory_gb = 0.0    # per-device budget for the memory planner; 0 = ask the backend, <0 = no check
  c.train.debug_sigterm_step = -1   # tests: the last process sends itself SIGTERM after this step
  return c
