"""The study reproduced: SFT on rendered pages, then DPO on the SFT model's own loops vs more SFT.

  python -m jaxdpo.main --config configs/demo_degeneration.py --workdir /tmp/jaxdpo-demo
  python -m jaxdpo.main --config configs/demo_degeneration.py:ci --workdir /tmp/jaxdpo-demo-ci   # ~2 min
  python -m jaxdpo.main --config configs/demo_degeneration.py:gemma3 --workdir /tmp/jaxdpo-demo-gemma3
  (`:gemma3_ci` is the short plumbing run of the Gemma 3 variant.)

Six stages in one job (jaxdpo/jobs/demo.py): SFT, eval, mine, DPO (SFT as reference, with an SFT
term), the control (SFT continued on the mined pages, same steps and lr), eval of both; then
DIR/report.md, report.json and report.png. A re-run resumes at the stage where it stopped.
The pages (jaxdpo/demo/pages.py) are drawn from `seed`; `--config.seed=N` changes everything.
"""

import ml_collections

from jaxdpo.errors import ConfigError
from jaxdpo.jobs import defaults as config_defaults

VARIANTS = ("full", "ci", "gemma3", "gemma3_ci")


def get_config(arg=None):
  variant = arg or "full"
  if variant not in VARIANTS:
    raise ConfigError(f"configs/demo_degeneration.py:{variant}: expected one of {VARIANTS}")
  c = config_defaults.base()
  c.job = "demo"
  c.model.family = "qwen2_5_vl"
  c.model.preset = "demo_vl"
  c.data.train = ""
  c.data.max_length = 112          # SFT: the prompt (57 tokens) + a 6-line transcription (53) + EOS
  c.data.truncation = "off"        # nothing is cut silently: a record that does not fit is an error
  c.generate.max_new_tokens = 64   # the longest transcription is 54 tokens with EOS
  c.generate.max_prompt_length = 64
  c.generate.batch_size = 50
  c.degeneration.max_period = 16
  c.degeneration.tail_window = 32
  c.mine.num_samples = 2
  c.mine.temperature = 1.0
  c.mine.rejected = "degenerate"
  c.dpo.beta = 0.1
  c.dpo.rpo_alpha = 1.0            # the SFT term on chosen: DPO must not learn to stop early
  c.optim.schedule = "warmup_cosine"
  c.train.log_every = 25
  c.train.ckpt_every = 250
  c.train.max_to_keep = 1

  c.demo = ml_collections.ConfigDict()
  c.demo.sft_pages = 3000
  c.demo.mine_pages = 400
  c.demo.heldout_pages = 400
  # Converges: loss 3.9 flat to ~step 250, then 0.06 at 2000 (BUILD_NOTES, issue 15, e4/e5); lr 1e-2 stays
  # at the unigram loss.
  c.demo.sft_steps = 2000
  c.demo.sft_batch_size = 16
  c.demo.sft_lr = 3e-3
  c.demo.sft_warmup_steps = 50
  c.demo.dpo_steps = 100
  c.demo.dpo_batch_size = 16
  c.demo.dpo_lr = 3e-4
  c.demo.dpo_warmup_steps = 10
  if variant.startswith("gemma3"):
    # The Gemma 3 reader (`demo_gemma`): square 64x64 px pages (SigLIP's fixed size), 64 image tokens plus
    # boi / eoi, so the prompt is 76 tokens (Qwen's 57) and every length grows by 19.
    c.model.family = "gemma3"
    c.model.preset = "demo_gemma"
    c.data.max_length = 131        # prompt 76 + a 6-line transcription (53) + end of turn + EOS
    c.generate.max_prompt_length = 80
  if variant.endswith("ci"):
    c.demo.sft_pages = 96
    c.demo.mine_pages = 24
    c.demo.heldout_pages = 24
    c.demo.sft_steps = 12
    c.demo.sft_batch_size = 8
    c.demo.dpo_steps = 4
    c.demo.dpo_batch_size = 4
    c.demo.sft_warmup_steps = 2
    c.demo.dpo_warmup_steps = 1
    c.generate.batch_size = 24
    c.mine.num_samples = 1
    c.mine.temperature = 0.0       # greedy: a barely trained model loops on every page
    c.train.log_every = 2
    c.train.ckpt_every = 4
  c.lock()
  return c
