"""Weight conversion CLI.

  python -m jaxdpo.convert hf-to-jax --hf-dir HF_DIR --out CKPT_DIR [--tokenizer DIR | --no-tokenizer] [--overwrite]
  python -m jaxdpo.convert jax-to-hf --ckpt CKPT_DIR --out HF_DIR [--overwrite]
  python -m jaxdpo.convert jax-to-hf --peft --ckpt WORKDIR --out PEFT_DIR [--overwrite]
  python -m jaxdpo.convert jax-to-hf --merge-lora --ckpt WORKDIR --out HF_DIR [--overwrite]

Both directions are all-or-nothing: output is written to a temporary directory next to the
target and renamed into place only when every tensor has been converted and checked.

hf-to-jax first checks that the tokenizer (and, for vision-language models, the image processor,
preprocessor_config.json) loads from HF_DIR, as the jobs will load it from CKPT_DIR/tokenizer;
if not, it stops before writing anything. --tokenizer DIR takes those files from DIR instead;
--no-tokenizer converts the weights only (no CKPT_DIR/tokenizer; pass data.tokenizer to jobs).

jax-to-hf --peft / --merge-lora export a LoRA run (config.lora.rank > 0): --ckpt is the run's WORKDIR
(its newest checkpoint) or WORKDIR/checkpoints/STEP. --peft writes adapter_model.safetensors and
adapter_config.json for peft.PeftModel.from_pretrained(base, PEFT_DIR), the base being the HF export of
the run's model.checkpoint; --merge-lora writes the base with the adapters folded in (from_pretrained).
"""

from __future__ import annotations

import argparse
import os
import sys

# transformers prints an advisory banner at import when torch is absent; conversion never needs torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import functools

from jaxdpo.data import tokenizer_check
from jaxdpo.errors import UserError
from jaxdpo.models import io


HF_TO_JAX = """HF safetensors -> jaxdpo (orbax) checkpoint. The tokenizer (and, for vision-language
models, the image processor) must load from --hf-dir, or from --tokenizer DIR, as the jobs will
load it from CKPT_DIR/tokenizer; otherwise nothing is written. --no-tokenizer skips it."""


JAX_TO_HF = """jaxdpo checkpoint -> HF safetensors directory. --ckpt is a converted checkpoint
(jaxdpo_model.json + params/, e.g. a run's WORKDIR/model, which a LoRA run writes merged).
A LoRA run (config.lora.rank > 0) also exports from its training checkpoint: --ckpt WORKDIR (the newest
checkpoint) or WORKDIR/checkpoints/STEP, with --peft (PEFT adapter for the HF export of the run's base)
or --merge-lora (full HF model, the adapters folded into the base). A directory without adapters is refused."""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxdpo.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-jax", help="HF safetensors -> jaxdpo (orbax) checkpoint", description=HF_TO_JAX)
  a.add_argument("--hf-dir", required=True, metavar="HF_DIR")
  a.add_argument("--out", required=True, metavar="CKPT_DIR")
  a.add_argument("--overwrite", action="store_true")
  tok = a.add_mutually_exclusive_group()
  tok.add_argument("--tokenizer", metavar="DIR",
                   help="take the tokenizer / image processor files from DIR instead of --hf-dir")
  tok.add_argument("--no-tokenizer", action="store_true",
                   help="convert the weights only: write no CKPT_DIR/tokenizer")
  b = sub.add_parser("jax-to-hf", help="jaxdpo checkpoint -> HF safetensors directory (or a LoRA run -> PEFT)",
                     description=JAX_TO_HF)
  b.add_argument("--ckpt", required=True, help="a converted checkpoint (e.g. WORKDIR/model); with --peft or "
                 "--merge-lora: a LoRA run's WORKDIR or WORKDIR/checkpoints/STEP")
  b.add_argument("--out", required=True)
  b.add_argument("--overwrite", action="store_true")
  b.add_argument("--max-shard-gb", type=float, default=2.0)
  how = b.add_mutually_exclusive_group()
  how.add_argument("--peft", action="store_true",
                   help="write the LoRA adapters as a PEFT adapter (adapter_model.safetensors, adapter_config.json)")
  how.add_argument("--merge-lora", action="store_true",
                   help="write the base with the LoRA adapters merged in, a full HF model")
  args = parser.parse_args(argv)
  try:
    if args.command == "hf-to-jax":
      out = io.hf_to_jax_dir(args.hf_dir, args.out, overwrite=args.overwrite,
                             tokenizer=False if args.no_tokenizer else (args.tokenizer or True),
                             check_tokenizer=functools.partial(tokenizer_check.require, given=args.tokenizer is not None))
    elif args.peft or args.merge_lora:
      from jaxdpo.jobs import lora_export  # reads the run's config.json (a jobs-layer job)
      out = (lora_export.write_peft(args.ckpt, args.out, overwrite=args.overwrite) if args.peft else
             lora_export.write_merged(args.ckpt, args.out, overwrite=args.overwrite,
                                      max_shard_bytes=int(args.max_shard_gb * (1 << 30))))
    else:
      out = io.jax_to_hf_dir(args.ckpt, args.out, overwrite=args.overwrite,
                             max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
  except UserError as e:  # bad input; anything else keeps its traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
