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
  c.job = "dpo"                     # dpo | sft | eval | mine | demo | ref_logps
  c.seed = 0                        # model init, data order and sampling

  c.model = ml_collections.ConfigDict()
  c.model.family = "qwen2"          # registry name; ignored when `checkpoint` is set
  c.model.preset = "tiny"           # preset of the family, for randomly initialised models
  c.model.checkpoint = ""           # converted checkpoint dir (python -m jaxdpo.convert hf-to-jax)
  c.model.param_dtype = "float32"   # float32 | bfloat16 (master weights)
  c.model.compute_dtype = "float32" # float32 | bfloat16 (matmuls and activations)
  c.model.attention_impl = ""       # "" = auto: cudnn on GPU, xla elsewhere
  c.model.trainable = "all"         # all | language (vision tower + projector frozen) | a regex over
                                    # parameter paths (matching ones train), e.g. "language_model/layers/(2[4-9]|3)"

  c.lora = ml_collections.ConfigDict()  # LoRA (dpo, sft): adapters train, the base is frozen; in DPO the reference
                                    # is the base (adapters off), so no reference copy is held
  c.lora.rank = 0                   # adapter rank r; 0 = LoRA off (full fine-tuning, or model.trainable)
  c.lora.alpha = 16.0               # adapter output scale alpha / rank (PEFT's lora_alpha)
  c.lora.dropout = 0.0              # adapter input dropout; only 0 is implemented (other values are refused)
  c.lora.base_dtype = ""            # "" = model.param_dtype | float32 | bfloat16: storage of the frozen base (adapters
                                    # stay float32)
  c.lora.targets = ""               # regex over linear-module paths ("language_model/layers/3/self_attn/q");
                                    # "" = q, k, v, o, gate, up, down of every language-model layer

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # axis sizes; one may be -1 (the rest)
  c.sharding_rules = ""             # "" = jaxdpo.parallel.sharding.DEFAULT_RULES; else "name=axis1+axis2,name2=,..."

  c.data = ml_collections.ConfigDict()
  c.data.train = assets.path("tiny_prefs.jsonl")  # .jsonl / .json / .parquet file, or a hub dataset name
  c.data.eval = ""                  # held-out records, scored every train.eval_every steps (and at the end)
  c.data.split = "train"            # for hub datasets
  c.data.tokenizer = assets.path("tiny_tokenizer")  # a local tokenizer dir (AutoTokenizer)
  c.data.max_length = 64            # tokens per sequence (prompt + completion)
  c.data.max_prompt_length = 0      # 0 = max_length // 2 when truncating
  c.data.truncation = "keep_end"    # keep_end | keep_start | off
  c.data.layout = "pairs"           # dpo, ref_logps: pairs = two rows per pair (prompt+chosen, prompt+rejected);
                                    # shared = one row [prompt | chosen | rejected] per pair, the prompt computed once
                                    # (same loss, metrics and gradients; rows sized to the data's longest pair)
  c.data.pack_tokens = 0            # with data.layout=shared: pack several pairs per row of this many tokens (images
                                    # too; live reference, one process, xla attention); 0 = one pair per row
  c.data.use_chat_template = True   # wrap prompts with the tokenizer's chat template
  c.data.shuffle = True             # shuffle the training order (seeded)
  c.data.prompts = ""               # eval / mine input: {"prompt", "reference"?, "images"?} records
  c.data.degeneration_eval = ""     # dpo/sft: prompts whose degeneration rate is logged every
                                    # train.degeneration_eval_every steps as eval/degeneration_rate
  c.data.skip_bad_records = False   # bad records (validation, tokenization, images) are skipped and listed in
                                    # DIR/skipped.jsonl instead of stopping the job
  c.data.max_skip_share = 0.01      # with skip_bad_records: stop when more than this share of a file is bad
  c.data.max_images = 0             # vision models: image slots per record (pair); 0 = the most any record has
  c.data.max_patches = 0            # Qwen2.5-VL: vision patches per record (pair); 0 = the most any record needs

  c.dpo = ml_collections.ConfigDict()
  c.dpo.loss_type = "sigmoid"       # TRL 1.16's loss types: sigmoid | hinge | ipo | exo_pair | nca_pair | robust |
                                    # bco_pair | sppo_hard | aot | aot_unpaired | apo_zero | apo_down | discopop | sft |
                                    # sigmoid_norm; several joined by commas combine ("sigmoid,sft")
  c.dpo.loss_weights = ""           # one weight per loss type, e.g. "1,0.5": loss = sum of weight * mean(loss); "" = all 1
  c.dpo.beta = 0.1                  # strength of the KL penalty to the reference, as in TRL (IPO's tau)
  c.dpo.label_smoothing = 0.0       # robust / exo_pair (needs > 0) / aot / aot_unpaired epsilon; cDPO on sigmoid
  c.dpo.ld_alpha = 1.0              # LD-DPO: weight of the tokens past the shorter completion's length, in [0, 1];
                                    # 1 = off (TRL's None)
  c.dpo.f_divergence_type = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence (others than
                                    # reverse_kl: sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft only)
  c.dpo.f_alpha_divergence_coef = 0.5  # alpha of f_divergence_type=alpha_divergence
  c.dpo.discopop_tau = 0.05         # DiscoPOP's temperature (loss_type=discopop)
  c.dpo.rpo_alpha = 0.0             # weight of the NLL term on chosen (RPO; = loss_type "sigmoid,sft"); 0 = off
  c.dpo.reference_free = False      # no reference model (its log-probs taken as 0)
  c.dpo.reference = "model"         # model: frozen copy of the initial policy; cached: precomputed once
                                    # (in memory); cache:PATH: read from PATH, written by job=ref_logps

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6                 # peak learning rate (AdamW)
  c.optim.schedule = "warmup_cosine"  # warmup_cosine | constant | warmup_linear
  c.optim.warmup_steps = 10
  c.optim.end_lr_ratio = 0.0        # final lr as a fraction of optim.lr
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.max_grad_norm = 1.0       # global-norm clipping; 0 = off
  c.optim.mu_dtype = ""             # "" = the parameter dtype | float32 | bfloat16: AdamW's first moment (bf16 halves it)

  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 64
  c.generate.max_prompt_length = 64  # prompts are left-padded to this, so generation compiles once
  c.generate.batch_size = 8
  c.generate.temperature = 0.0       # 0 = greedy
  c.generate.top_p = 1.0
  c.generate.top_k = 0               # 0 = off
  c.generate.chunk_batches = 16      # eval/mine save rows every this many batches (DIR/chunks/<job>); a re-run
                                    # in the same workdir resumes from the saved chunks
  c.generate.debug_kill_after_chunk = -1  # tests: the process SIGKILLs itself after saving this chunk
  c.generate.refill = True           # continuous batching: a finished row takes the next prompt (greedy outputs
                                     # per record as with static batches; greedy on one device only, else
                                     # static); False = static batches
  c.generate.stop_on_loop = False    # stop a row whose tail is a confirmed exact loop (degeneration.*), recorded
                                     # as degenerate_early; off = the study's full-length definition
  c.generate.stop_on_loop_check = False  # with stop_on_loop: also run every record to full length, and report how
                                     # the early and full-length verdicts agree (eval_summary early_stop)
  c.generate.stop_on_loop_min_run = 0  # with stop_on_loop: tokens the loop must cover before its row is cut; 0 =
                                     # 2 * min(degeneration.tail_window, max_new_tokens) (two windows: loops a
                                     # model leaves, and lines that really repeat, keep decoding); a value not
                                     # below max_new_tokens never cuts (degeneration.default_min_run)

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
  c.train.num_steps = 100           # optimizer steps in the whole run (resumes continue to it)
  c.train.batch_size = 8            # global number of pairs (or sequences for sft) per optimizer step
  c.train.grad_accum = 1            # micro-batches per step (must divide batch_size)
  c.train.log_every = 10            # steps between metrics.jsonl lines
  c.train.ckpt_every = 50           # steps between checkpoints (and one at the end)
  c.train.max_to_keep = 3           # checkpoints kept in DIR/checkpoints
  c.train.eval_every = 0            # steps between evals on data.eval; 0 = only at the end
  c.train.eval_batches = 4          # batches of data.eval per eval
  c.train.degeneration_eval_every = 0  # steps between degeneration evals on data.degeneration_eval
  c.train.stop_at_step = -1         # stop (after checkpointing) at this step; -1 = run to num_steps
  c.train.logprob_chunk = 256       # vocab-projection chunk (tokens) when computing log-probs
  c.train.remat = "none"            # decoder-block rematerialisation: none | full | dots_saveable | dots_no_batch |
                                    # save_attn | save_qkv_proj (jaxdpo.models.remat: what each keeps per layer)
  c.train.scan_layers = False       # run repeated decoder blocks as one jax.lax.scan (compiles each block kind
                                    # once; parameters stay stored per layer); the full-size configs turn it on
  c.train.stacked_params = "auto"   # DPO: hold the scanned layers stacked in the train state (params, AdamW state):
                                    # auto = with scan_layers (not with LoRA / model.trainable) | on | off;
                                    # checkpoints stay per layer
  c.train.tensorboard = False       # also log to DIR/tensorboard (needs tensorboardX)
  c.train.progress = True           # progress bar on stderr
  c.train.straggler_factor = 10.0   # warn when a step takes this many times the median; 0 = off
  c.train.device_memory_gb = 0.0    # per-device budget for the memory planner; 0 = ask the backend, <0 = no check
  c.train.allow_changed = ""        # resume despite these changed keys, e.g. train.num_steps,train.log_every ("safe": all safe ones)
  c.train.on_nonfinite = "stop"     # a NaN/inf loss or grad norm: stop naming the step | skip the update (counted)
  c.train.debug_nonfinite_step = -1 # tests: the loss and gradients of this step are made NaN inside the step
  c.train.debug_sigterm_step = -1   # tests: the last process sends itself SIGTERM after this step
  return c
