"""Degeneration eval on the embedded prompts; point it at a trained model.

  python -m jaxdpo.main --config configs/tiny_eval.py --workdir /tmp/jaxdpo-eval \
      --config.model.checkpoint=/tmp/jaxdpo-sft/model
  -> generations.jsonl, eval_summary.json
"""

from jaxdpo import assets
from jaxdpo.jobs import defaults as config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.job = "eval"
  c.data.prompts = assets.path("tiny_prompts.jsonl")
  c.generate.max_new_tokens = 24
  c.generate.max_prompt_length = 24
  c.generate.batch_size = 8
  c.degeneration.tail_window = 24
  c.lock()
  return c
