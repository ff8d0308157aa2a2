"""The full-size DPO recipe shared by the 3-4B vision-language configs: fp32 master weights, bf16
compute, parameters and optimizer state sharded over every device (fsdp=-1), the decoder layers
scanned and fully rematerialised."""

from jaxdpo.jobs import defaults as config_defaults


def full_size_dpo(family: str, preset: str, checkpoint: str | None = None):
  """The DPO config of one full-size model.

  Args:
    family: the model family ("qwen2_5_vl", "gemma3").
    preset: the family's full-size preset, used when no checkpoint is given (random init, for
      memory planning and benchmarks).
    checkpoint: a converted checkpoint directory; it also gives the tokenizer (converted
      directories carry the tokenizer files).
  """
  c = config_defaults.base()
  c.job = "dpo"
  c.model.update(family=family, preset=preset, checkpoint=checkpoint or "", param_dtype="float32",
                 compute_dtype="bfloat16")
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if checkpoint:
    c.data.tokenizer = checkpoint.rstrip("/") + "/tokenizer"
  c.data.update(max_length=2048, max_prompt_length=1024)
  c.dpo.update(beta=0.1, reference="model")
  c.optim.update(lr=1e-6, warmup_steps=50, weight_decay=0.0)
  # Scan: one compile per block kind instead of one per layer. Full remat: without it a device's 4 pairs of
  # 2048 tokens keep ~119 GiB of activations (the planner's estimate); with it ~one [T, D] input per layer.
  # grad_accum=4: 32 pairs are 8 per micro-batch on one GPU (~15 GiB of activations under full remat, the
  # planner's estimate; with 1 micro-batch ~59 GiB, which puts a 3B full fine-tune over 120 GiB) and 1 per
  # device on 8 chips (a v5e-8 then fits in its 16 GiB; `python -m jaxdpo.bench --stages`).
  c.train.update(num_steps=1000, batch_size=32, grad_accum=4, log_every=10, ckpt_every=200, logprob_chunk=256,
                 remat="full", scan_layers=True)
  c.lock()
  return c


# The generation settings of a full page (README "Real weights"): prompts (page image + instruction) are
# left-padded to 1024 tokens and transcriptions may run to 1024 new tokens, so a mined pair (prompt +
# a rejected loop at the limit) fits the DPO configs' data.max_length = 2048 exactly.
PAGE_PROMPT_TOKENS = 1024
PAGE_NEW_TOKENS = 1024


def full_size_generation(family: str, preset: str, checkpoint: str | None, job: str):
  """The eval or mine config of one full-size model (bf16 weights, the batch split over every device).

  Args:
    family, preset, checkpoint: as for `full_size_dpo`; without a checkpoint the preset is random (for
      memory planning only).
    job: "eval" (greedy, the study's definition: degenerate = ran to the limit with a looping tail) or
      "mine" (4 samples at T=1 per page; rows whose tail is a confirmed loop stop early, which saves most
      of a loop's decode time and gives the same pair).
  """
  if job not in ("eval", "mine"):
    raise ValueError(f"job must be 'eval' or 'mine', not {job!r}")
  c = config_defaults.base()
  c.job = job
  # Generation needs no fp32 master weights: bf16 halves the weights read per decoded token.
  c.model.update(family=family, preset=preset, checkpoint=checkpoint or "", param_dtype="bfloat16",
                 compute_dtype="bfloat16")
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if checkpoint:
    c.data.tokenizer = checkpoint.rstrip("/") + "/tokenizer"
  # Decoding reads every weight once per step whatever the rows, so more rows cost little time: 64 rows (eval,
  # refilled as rows finish) and 128 (mine's static sampled batches) keep the caches ~5 / ~10 GB on one GPU.
  c.generate.update(max_new_tokens=PAGE_NEW_TOKENS, max_prompt_length=PAGE_PROMPT_TOKENS,
                    batch_size=64 if job == "eval" else 128)
  # A loop of period <= 64 must cover half of the last 256 tokens (as in the README's eval command).
  c.degeneration.update(tail_window=256, max_period=64)
  if job == "mine":
    c.mine.update(num_samples=4, temperature=1.0, rejected="degenerate", chosen="reference")
    c.generate.stop_on_loop = True
  c.lock()
  return c
