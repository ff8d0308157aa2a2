"""Mining preference pairs from the model's own samples of Qwen2.5-VL-3B-Instruct on full pages: 4 samples per page at T=1, loops cut short; -> pairs.jsonl, samples.jsonl, mine_summary.json.

  python -m jaxdpo.convert hf-to-jax --hf-dir /models/Qwen2.5-VL-3B-Instruct --out /ckpt/qwen2_5_vl_3b
  python -m jaxdpo.main --config configs/qwen2_5_vl_3b_mine.py:/ckpt/qwen2_5_vl_3b --workdir /runs/mine \
      --config.data.prompts=/data/pages_mine.jsonl

Records are {"prompt", "reference", "images"} JSONL (README "Record formats"). The argument is the
converted checkpoint directory (a DPO run's `DIR/model` works too); it also gives the tokenizer.
Prompts are left-padded to 1024 tokens and outputs may run to 1024 new tokens, so mined pairs fit
the DPO config's data.max_length=2048 (`jaxdpo.configs._full_size.full_size_generation` says why
each setting is what it is). `python -m jaxdpo.bench --stages` prints the memory and time estimates.
"""

from jaxdpo.configs._full_size import full_size_generation


def get_config(arg=None):
  return full_size_generation("qwen2_5_vl", "qwen2_5_vl_3b", arg, "mine")
