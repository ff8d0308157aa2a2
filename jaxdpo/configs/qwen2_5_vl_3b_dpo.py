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

from jaxdpo.configs._full_size import full_size_dpo


def get_config(arg=None):
  return full_size_dpo("qwen2_5_vl", "qwen2_5_vl_3b", arg)
