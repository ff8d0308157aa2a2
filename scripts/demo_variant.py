"""Runs the demo job (or any job) with its page specs and `demo_vl` shape replaced, for screening designs.

  DEMO_SPECS='{"sft": {"cols": 6, "rows": 8, ...}, "mine": {...}, "heldout": {...}}' \
  DEMO_TEXT='{"rope_theta": 1e6}' DEMO_VISION='{}' \
  python scripts/demo_variant.py --config configs/demo_degeneration.py --workdir /tmp/v1 [--config.a.b=v ...]

`DEMO_SPECS` replaces `jaxdpo.demo.pages.SPLITS` (PageSpec fields; lists become tuples), `DEMO_TEXT` /
`DEMO_VISION` replace fields of the `demo_vl` preset's text decoder / vision tower (one `replace`, so a
narrower decoder can come with its `out_hidden_size`). Everything runs in this process, so the demo's six
stages see the replacements; saved checkpoints carry their own config, so later evals need no env.
Used for the issue 15 experiments e11-e16 (BUILD_NOTES, "The study reproduced").
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys


def _fields(text: str) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text or "{}").items()}


def main():
  from jaxdpo.demo import pages
  from jaxdpo.models.qwen2_5_vl import config as qwen_config
  specs = _fields(os.environ.get("DEMO_SPECS", ""))
  if specs:
    if set(specs) != {"sft", "mine", "heldout"}:
      raise SystemExit(f"DEMO_SPECS: need the keys sft, mine, heldout, got {sorted(specs)}")
    pages.SPLITS.clear()  # in place: jobs/demo.py reads the module's dict
    pages.SPLITS.update({k: pages.PageSpec(**_fields(json.dumps(v))) for k, v in specs.items()})
  text, vision = _fields(os.environ.get("DEMO_TEXT", "")), _fields(os.environ.get("DEMO_VISION", ""))
  if text or vision:
    base = qwen_config.VL_PRESETS["demo_vl"]

    def demo_vl():
      c = base()
      return dataclasses.replace(c, text=dataclasses.replace(c.text, **text),
                                 vision=dataclasses.replace(c.vision, **vision))
    qwen_config.VL_PRESETS["demo_vl"] = demo_vl
  print(f"pages: {pages.SPLITS}\nmodel: {qwen_config.VL_PRESETS['demo_vl']()}", flush=True)
  from jaxdpo.cli.main import cli
  cli(sys.argv)


if __name__ == "__main__":
  main()
