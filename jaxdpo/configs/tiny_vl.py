"""Tiny vision-language jobs (sft | eval | mine | dpo) on image records, for tests and smoke runs.

  python -m jaxdpo.main --config configs/tiny_vl.py:sft --workdir /tmp/vl-sft \
      --config.model.checkpoint=CKPT --config.data.tokenizer=CKPT/tokenizer \
      --config.data.train=records.jsonl
  then eval / mine (data.prompts) and dpo (data.train = mine's DIR/pairs.jsonl), each taking the
  previous training job's DIR/model as model.checkpoint and DIR/model/tokenizer as data.tokenizer.

CKPT is a converted Qwen2.5-VL or Gemma 3 checkpoint whose tokenizer dir holds the image
processor's preprocessor_config.json (tests build tiny ones).
"""

from jaxdpo.jobs import defaults as config_defaults

JOBS = ("sft", "eval", "mine", "dpo")


def get_config(arg=None):
  job = arg or "dpo"
  if job not in JOBS:
    raise ValueError(f"configs/tiny_vl.py:{job}: expected one of {JOBS}")
  c = config_defaults.base()
  c.job = job
  c.data.train = ""
  c.data.max_length = 64
  c.generate.max_new_tokens = 12
  c.generate.max_prompt_length = 48
  c.generate.batch_size = 4
  c.degeneration.tail_window = 12
  c.mine.num_samples = 2
  c.mine.rejected = "worst_cer"  # a barely trained tiny model rarely loops
  c.optim.lr = 3e-3 if job == "sft" else 1e-3
  c.optim.warmup_steps = 1
  c.train.num_steps = 4
  c.train.batch_size = 2
  c.train.log_every = 2
  c.train.ckpt_every = 4
  c.lock()
  return c
