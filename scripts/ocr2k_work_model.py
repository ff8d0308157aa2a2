"""A FLOP model of the ocr-2k step under several row layouts: which ones could reach work_ratio <= 0.80.

  python scripts/ocr2k_work_model.py [--pairs 20000]

The model counts what the CPU-compiled step does per pair (Qwen2.5-3B, bf16, live reference, remat
`dots_no_batch`, shared rows [P | C | R]): the dense matmuls 4 times per token slot (policy forward,
two backward matmuls, reference forward; nothing recomputed), the LM head 4 times per scored
position, and XLA's dense attention 5 times (forward, its recompute, two backward, reference) over
each attention call's T x T scores. Useful work is `shared/bench/README.md`'s formula. On today's
layout (every row 3328 slots, 2 x 1024 scored positions) it gives 1.279 against `--analyze`'s
measured 1.276, so the layouts below are priced on the same scale. Used for BUILD_NOTES "Fast step"
(why ocr-2k stays above 0.80); it runs no model.
"""

from __future__ import annotations

import argparse

import numpy as np

D, LAYERS, VOCAB, PARAMS = 2048, 36, 151936, 3.09e9
DENSE = 2 * (PARAMS - VOCAB * D)  # per token slot and pass
HEAD = 2 * VOCAB * D  # per scored position and pass
SEQ = 1280 + 1024  # the README formula's attention length for ocr-2k


def useful(p, c, r):
  return (2 * p + c + r) * (DENSE + HEAD + 2 * LAYERS * SEQ * D) * 4


def cost(slots, scored, scores):
  """slots: token slots of the rows; scored: LM-head positions; scores: sum of T x S of the attention calls."""
  return 4 * DENSE * slots + 4 * HEAD * scored + 5 * 4 * scores * D * LAYERS


def block_causal(t, block):
  """Scores of a causal call that skips key blocks after each query block (t a multiple of block)."""
  n = -(-t // block)
  return t * t * (n + 1) / (2 * n)


def up(n, m):
  return -(-n // m) * m


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--pairs", type=int, default=20000)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  p = rng.integers(256, 1281, args.pairs)
  c = rng.integers(64, 1025, args.pairs)
  r = np.where(rng.random(args.pairs) < 0.5, 1024, rng.integers(64, 1025, args.pairs))
  total_useful = useful(p, c, r).sum()
  n = p + c + r
  k = np.maximum(c, r)
  layouts = {
      "today: 3328 slots, 2 x 1024 scored, dense": cost(3328, 2048, 3328.0 ** 2) * np.ones_like(n),
      "exact per-pair rows, exact head, dense": cost(n, c + r, n.astype(float) ** 2),
      "exact per-pair [P|C] + [P|R] causal calls": cost(n, c + r, ((p + c) ** 2 + (p + r) ** 2) / 2.0),
      "rows and completions rounded to 256, dense": cost(up(n, 256), 2 * up(k, 256), up(n, 256) ** 2.0),
      "rounded to 256, block-causal 128": cost(up(n, 256), 2 * up(k, 256),
                                               np.array([block_causal(t, 128) for t in up(n, 256)])),
      "rounded to 512, block-causal 128": cost(up(n, 512), 2 * up(k, 512),
                                               np.array([block_causal(t, 128) for t in up(n, 512)])),
  }
  for name, per_pair in layouts.items():
    print(f"{per_pair.sum() / total_useful:6.3f}  {name}")
  shapes = len({(a, b) for a, b in zip(up(n, 256), up(k, 256))})
  print(f"distinct (row, completion) shapes at 256: {shapes} (each a separate compile)")


if __name__ == "__main__":
  main()
