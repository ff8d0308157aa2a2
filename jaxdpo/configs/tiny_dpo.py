"""The embedded default: DPO on a tiny random Qwen2 decoder and the shipped preference set.

  python -m jaxdpo.main --config configs/tiny_dpo.py --workdir /tmp/jaxdpo-demo

Runs on a laptop CPU in about a minute with no network and no downloaded model.
"""

from jaxdpo import assets
from jaxdpo.jobs import defaults as config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.job = "dpo"
  c.model.family = "qwen2"
  c.model.preset = "tiny"
  c.dpo.beta = 0.1
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.train.num_steps = 150
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.ckpt_every = 50
  c.data.max_length = 48
  c.data.eval = assets.path("tiny_prefs_eval.jsonl")  # held-out pairs, scored at the end of the run
  c.lock()
  return c
