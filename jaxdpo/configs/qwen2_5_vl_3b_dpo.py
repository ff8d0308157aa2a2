"""Full-size DPO of Qwen2.5-VL-3B-Instruct (or Nanonets-OCR2-3B): fp32 master weights, bf16 compute.

  python -m jaxdpo.convert hf-to-jax --hf-dir /models/Qwen2.5-VL-3B-Instruct --out /ckpt/qwen2_5_vl_3b
  python -m jaxdpo.main --config configs/qwen2_5_vl_3b_dpo.py:/ckpt/qwen2_5_vl_3b --workdir gs://... \
      --config.data.train=/data/ocr_prefs.jsonl

The optional argument is a converted checkpoint directory; it sets `model.checkpoint` and the
tokenizer (converted directories carry the tokenizer files). Without it the preset is randomly
initialised (useful for memory planning and benchmarks), and `--config.model.checkpoint=DIR`
still overrides it. The mesh shards parameters and optimizer state over every device
(fsdp=-1); see launch/README.md for the mesh to pick on each TPU slice or GPU node.
"""

from jaxdpo.jobs import defaults as config_defaults



def get_config(arg=None):
  c = config_defaults.base()
  c.job = "dpo"
  c.model.family = "qwen2_5_vl"
  c.model.preset = "qwen2_5_vl_3b"
  c.model.checkpoint = arg or ""
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  if arg:
    c.data.tokenizer = arg.rstrip("/") + "/tokenizer"  # converted checkpoints carry it
  c.data.max_length = 2048
  c.data.max_prompt_length = 1024
  c.dpo.beta = 0.1
  c.dpo.reference = "model"
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.train.num_steps = 1000
  c.train.batch_size = 32
  c.train.log_every = 10
  c.train.ckpt_every = 200
  c.train.logprob_chunk = 256
  c.lock()
  return c
