"""Mine preference pairs from a model's own samples on the embedded prompts.

  python -m jaxdpo.main --config configs/tiny_mine.py --workdir /tmp/jaxdpo-mine \
      --config.model.checkpoint=/tmp/jaxdpo-sft/model
  -> pairs.jsonl (use as --config.data.train of the dpo job), samples.jsonl, mine_summary.json

A barely trained tiny model rarely loops in 24 tokens, so this demo falls back to the worst
sample by CER when no sample degenerated (`mine.rejected = "worst_cer"`); the study's setting
is `"degenerate"`.
"""

from jaxdpo import assets
from jaxdpo.jobs import defaults as config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.job = "mine"
  c.data.prompts = assets.path("tiny_mine_prompts.jsonl")  # disjoint from the eval prompts
  c.generate.max_new_tokens = 24
  c.generate.max_prompt_length = 24
  c.generate.batch_size = 8
  c.degeneration.tail_window = 24
  c.mine.num_samples = 2
  c.mine.temperature = 1.0
  c.mine.rejected = "worst_cer"
  c.lock()
  return c
