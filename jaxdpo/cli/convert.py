"""Weight conversion CLI.

  python -m jaxdpo.convert hf-to-jax --hf-dir HF_DIR --out CKPT_DIR [--overwrite]
  python -m jaxdpo.convert jax-to-hf --ckpt CKPT_DIR --out HF_DIR [--overwrite]

Both directions are all-or-nothing: output is written to a temporary directory next to the
target and renamed into place only when every tensor has been converted and checked.
"""

from __future__ import annotations

import argparse
import os
import sys

# transformers prints an advisory banner at import when torch is absent; conversion never needs torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxdpo.errors import UserError
from jaxdpo.models import io


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxdpo.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-jax", help="HF safetensors -> jaxdpo (orbax) checkpoint")
  a.add_argument("--hf-dir", required=True)
  a.add_argument("--out", required=True)
  a.add_argument("--overwrite", action="store_true")
  b = sub.add_parser("jax-to-hf", help="jaxdpo checkpoint -> HF safetensors directory")
  b.add_argument("--ckpt", required=True)
  b.add_argument("--out", required=True)
  b.add_argument("--overwrite", action="store_true")
  b.add_argument("--max-shard-gb", type=float, default=2.0)
  args = parser.parse_args(argv)
  try:
    if args.command == "hf-to-jax":
      out = io.hf_to_jax_dir(args.hf_dir, args.out, overwrite=args.overwrite)
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
