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
  c.train.update(num_steps=1000, batch_size=32, log_every=10, ckpt_every=200, logprob_chunk=256, remat="full",
                 scan_layers=True)
  c.lock()
  return c
