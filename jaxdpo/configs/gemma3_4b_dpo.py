"""Full-size DPO of gemma-3-4b-it: fp32 master weights, bf16 compute.

  python -m jaxdpo.convert hf-to-jax --hf-dir /models/gemma-3-4b-it --out /ckpt/gemma3_4b
  python -m jaxdpo.main --config configs/gemma3_4b_dpo.py:/ckpt/gemma3_4b --workdir gs://... \
      --config.data.train=/data/ocr_prefs.jsonl

The optional argument is a converted checkpoint directory; it sets `model.checkpoint` and the
tokenizer. Without it the preset is randomly initialised (memory planning, benchmarks), and
`--config.model.checkpoint=DIR` still overrides it. Gemma 3's 262k-token vocabulary makes the
tied embedding alone 2.7 GB in fp32, so parameters are sharded over every device (fsdp=-1).
"""

from jaxdpo.configs._full_size import full_size_dpo


def get_config(arg=None):
  return full_size_dpo("gemma3", "gemma3_4b", arg)
