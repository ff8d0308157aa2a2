"""Tiny vision-language jobs (sft | eval | mine | dpo) on the shipped page images, for smoke runs.

Each job runs as written, from any directory, with no download: a random `demo_vl` Qwen2.5-VL,
the demo tokenizer + image processor and 16 rendered pages in `jaxdpo/assets/tiny_vl/`
(scripts/make_tiny_vl_assets.py). The chain hands each job the previous one's outputs:

  python -m jaxdpo.main --config configs/tiny_vl.py:sft --workdir /tmp/vl/sft
  M="--config.model.checkpoint=/tmp/vl/sft/model --config.data.tokenizer=/tmp/vl/sft/model/tokenizer"
  python -m jaxdpo.main --config configs/tiny_vl.py:eval --workdir /tmp/vl/eval $M   # generations.jsonl
  python -m jaxdpo.main --config configs/tiny_vl.py:mine --workdir /tmp/vl/mine $M   # pairs.jsonl
  python -m jaxdpo.main --config configs/tiny_vl.py:dpo --workdir /tmp/vl/dpo $M \
      --config.data.train=/tmp/vl/mine/pairs.jsonl

Without $M, eval / mine / dpo start from the random preset; dpo's default data.train is the
shipped pairs.jsonl (chosen = the transcription, rejected = a loop). For your own model pass a
converted Qwen2.5-VL or Gemma 3 checkpoint as model.checkpoint, its tokenizer dir (holding the
image processor's preprocessor_config.json) as data.tokenizer, and your records.
"""

from jaxdpo import assets
from jaxdpo.jobs import defaults as config_defaults
from jaxdpo.errors import ConfigError

JOBS = ("sft", "eval", "mine", "dpo")
DATA = {"sft": ("train", "sft.jsonl"), "eval": ("prompts", "heldout.jsonl"), "mine": ("prompts", "mine.jsonl"),
        "dpo": ("train", "pairs.jsonl")}


def get_config(arg=None):
  job = arg or "dpo"
  if job not in JOBS:
    raise ConfigError(f"configs/tiny_vl.py:{job}: expected one of {JOBS}")
  c = config_defaults.base()
  c.job = job
  c.model.family = "qwen2_5_vl"
  c.model.preset = "demo_vl"  # 64 ids and 8-px merged vision tokens: the shipped tokenizer's and pages'
  c.data.tokenizer = assets.path("tiny_vl/tokenizer")
  c.data.train = ""
  key, name = DATA[job]
  c.data[key] = assets.path(f"tiny_vl/{name}")  # image paths inside resolve next to the records file
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
