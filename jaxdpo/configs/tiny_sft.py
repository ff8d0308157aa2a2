"""SFT on the embedded tiny set (the stage before DPO in the degeneration study).

  python -m jaxdpo.main --config configs/tiny_sft.py --workdir /tmp/jaxdpo-sft
  -> /tmp/jaxdpo-sft/model  (use as --config.model.checkpoint of eval / mine / dpo)
"""

from jaxdpo import assets
from jaxdpo.jobs import defaults as config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.job = "sft"
  c.data.train = assets.path("tiny_sft.jsonl")
  c.data.max_length = 48
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 5
  c.train.num_steps = 60
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.ckpt_every = 30
  c.lock()
  return c
