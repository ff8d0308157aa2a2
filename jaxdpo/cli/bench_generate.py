"""`python -m jaxdpo.bench --generate`: generation throughput with and without row refill and
early stop on loops, next to transformers' `generate`, on a tiny random Qwen2 on CPU.

Workload (`--prompts` P, `--batch` B, `--max-new-tokens` N, `--loop-share` L, default 10%):
  * A random Qwen2ForCausalLM (transformers, seeded, init std 0.05: greedy decoding falls into exact loops on about half the prompts within 128 tokens) is saved and converted with
    `jaxdpo.models.io.hf_to_jax_dir`, so both sides run the same weights.
  * A pool of random prompts (lengths U(4, T)) is decoded greedily to full length once. The EOS id
    is the token that ends the most pool rows within N / 2 steps while leaving enough looping ones. A prompt is *stopping* when its
    greedy output reaches that EOS, *looping* when it never does and its tail is an exact loop
    (the degeneration detector, `--tail-window`). The workload takes round(L * P) looping and the
    rest stopping prompts, shuffled. So "looping prompts" are prompts on which this model really
    loops to the limit, as degenerate OCR pages do on a real model.
  * Modes: `static` (today's batches of B, each waiting for its slowest row), `refill`, and
    `refill+stop_on_loop` (cut once the loop covers `--stop-min-run` tokens, default
    `degeneration.default_min_run`: two tail windows); `hf_generate` runs transformers' greedy `generate` on the same
    left-padded batches of B (CPU, torch). Each jaxdpo mode runs once to compile, then timed.

Prints one JSON line per mode (prompts/s, generated tokens/s, wall seconds, and whether its
per-prompt outputs equal static batching's) and a summary line with the speedups over static.
Speed is only measured here, never asserted.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np

from jaxdpo.generation import decode, degeneration
from jaxdpo.models import io


def _tiny_hf_qwen2(seed: int, out_dir: str):
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(seed)
  cfg = Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, head_dim=16, tie_word_embeddings=False, rope_theta=10_000.0,
                    initializer_range=0.05, max_position_embeddings=1024)
  hf = Qwen2ForCausalLM(cfg).eval()
  hf_dir, ck_dir = os.path.join(out_dir, "hf"), os.path.join(out_dir, "ck")
  hf.save_pretrained(hf_dir)
  io.hf_to_jax_dir(hf_dir, ck_dir)
  from flax import nnx
  _, _, graphdef, params = io.load_model(ck_dir)
  return hf, nnx.merge(graphdef, params)


def _prompts(rng, n: int, t: int, vocab: int):
  ids = np.zeros((n, t), np.int32)
  seg = np.zeros((n, t), np.int32)
  for i in range(n):
    k = rng.randint(4, t + 1)
    ids[i, t - k:] = rng.randint(1, vocab, k)
    seg[i, t - k:] = 1
  return ids, seg


def _static(model, ids, seg, b, n, eos, stop=None):
  toks, nums = [], []
  for s in range(0, len(ids), b):
    chunk = list(range(s, min(s + b, len(ids))))
    rows = chunk + chunk[-1:] * (b - len(chunk))
    out = jax.device_get(decode.generate(model, {"input_ids": ids[rows], "segment_ids": seg[rows]}, max_new_tokens=n,
                                         eos_token_id=eos, pad_token_id=0, stop_on_loop=stop))
    toks.append(np.asarray(out.tokens)[:len(chunk)])
    nums.append(np.asarray(out.num_generated)[:len(chunk)])
  return np.concatenate(toks), np.concatenate(nums)


def _refill(model, ids, seg, b, n, eos, stop=None, min_run=None):
  out = decode.generate_refill(model, len(ids), lambda j: {"input_ids": ids[j], "segment_ids": seg[j]}, batch_size=b,
                               prompt_length=ids.shape[1], max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                               stop_on_loop=stop, stop_min_run=min_run)
  return out.tokens, out.num_generated


def _hf(hf, ids, seg, b, n, eos):
  import torch
  toks, nums = [], []
  with torch.no_grad():
    for s in range(0, len(ids), b):
      x, m = torch.tensor(ids[s:s + b], dtype=torch.long), torch.tensor(seg[s:s + b])
      out = hf.generate(input_ids=x, attention_mask=m, do_sample=False, max_new_tokens=n, min_new_tokens=0,
                        eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:].numpy()
      full = np.zeros((out.shape[0], n), np.int64)
      full[:, :out.shape[1]] = out
      toks.append(full)
      nums.append(np.array([min(int(np.argmax(r == eos)) + 1 if (r == eos).any() else n, n) for r in full]))
  return np.concatenate(toks), np.concatenate(nums)


def build_workload(model, *, prompts: int, prompt_len: int, max_new: int, loop_share: float, cfg, seed: int):
  """(input_ids, segment_ids, eos id, is_looping [P]) as described in the module docstring."""
  rng = np.random.RandomState(seed)
  pool = max(8 * prompts, 256)
  ids, seg = _prompts(rng, pool, prompt_len, int(model.config.vocab_size))
  free, _ = _static(model, ids, seg, 64, max_new, eos=10 ** 6)
  half = free[:, :max_new // 2]
  counts = np.bincount(np.array([t for row in half for t in set(row.tolist())]), minlength=model.config.vocab_size)
  loops_free = np.array([degeneration.detect(row, True, cfg).is_degenerate for row in free])
  n_loop = int(round(loop_share * prompts))
  for eos in np.argsort(-counts):  # the most frequent early token that leaves enough looping rows
    eos = int(eos)
    has_eos = (free == eos).any(axis=1)
    loops = ~has_eos & loops_free
    loop_ids, stop_ids = np.flatnonzero(loops), np.flatnonzero(has_eos)
    if len(loop_ids) >= n_loop and len(stop_ids) >= prompts - n_loop:
      break
  else:
    raise RuntimeError(f"pool of {pool}: no EOS id leaves {n_loop} looping and {prompts - n_loop} stopping prompts "
                       f"(try another --seed or a longer --max-new-tokens)")
  pick = np.concatenate([rng.choice(loop_ids, n_loop, replace=False), rng.choice(stop_ids, prompts - n_loop,
                                                                               replace=False)])
  rng.shuffle(pick)
  return ids[pick], seg[pick], eos, loops[pick]


def run(*, prompts: int = 64, batch: int = 8, prompt_len: int = 16, max_new: int = 256, loop_share: float = 0.1,
        tail_window: int = 32, seed: int = 0, hf: bool = True, repeats: int = 1,
        stop_min_run: int | None = None) -> list[dict]:
  """The modes' JSON rows; `stop_min_run` is `generate.stop_on_loop_min_run` (None = its default)."""
  cfg = degeneration.DegenerationConfig(max_period=16, tail_window=tail_window)
  confirm = degeneration.confirm_run(cfg, max_new, stop_min_run)
  with tempfile.TemporaryDirectory() as tmp:
    hf_model, model = _tiny_hf_qwen2(seed, tmp)
  ids, seg, eos, looping = build_workload(model, prompts=prompts, prompt_len=prompt_len, max_new=max_new,
                                          loop_share=loop_share, cfg=cfg, seed=seed)
  modes = {"static": lambda: _static(model, ids, seg, batch, max_new, eos),
           "refill": lambda: _refill(model, ids, seg, batch, max_new, eos),
           "refill+stop_on_loop": lambda: _refill(model, ids, seg, batch, max_new, eos, stop=cfg, min_run=stop_min_run)}
  if hf:
    modes["hf_generate"] = lambda: _hf(hf_model, ids, seg, batch, max_new, eos)
  results, reference = [], None
  for name, fn in modes.items():
    if name != "hf_generate":
      fn()  # compile
    best = None
    for _ in range(repeats):
      t0 = time.perf_counter()
      toks, nums = fn()
      dt = time.perf_counter() - t0
      best = dt if best is None else min(best, dt)
    if reference is None:
      reference = (toks, nums)
    cut = nums < reference[1]
    same = bool((nums == reference[1]).all() and all((a[:k] == b[:k]).all() for a, b, k in zip(toks, reference[0], nums)))
    prefix = bool(all((a[:k] == b[:k]).all() for a, b, k in zip(toks, reference[0], nums)))
    extra = {}
    if name == "refill+stop_on_loop":
      # Early classification (cut short, or ran to the limit with a looping tail) vs the study's
      # full-length one on the static run of the same prompts (acceptance 3's measure, here).
      early = [bool(c) or (k == max_new and degeneration.detect(t, True, cfg).is_degenerate)
               for t, k, c in zip(toks, nums, cut)]
      full = [k == max_new and degeneration.detect(t, True, cfg).is_degenerate for t, k in zip(*reference)]
      extra = {"stop_min_run": confirm, "early_vs_full_agreement": float(np.mean(np.array(early) == np.array(full))),
               "early_degenerate": int(sum(early)), "full_degenerate": int(sum(full))}
    results.append({"bench": "generate", "mode": name, **extra, "prompts": prompts, "batch": batch, "max_new_tokens": max_new,
                    "looping_prompts": int(looping.sum()), "wall_s": best, "prompts_per_s": prompts / best,
                    "generated_tokens": int(nums.sum()), "generated_tokens_per_s": float(nums.sum()) / best,
                    "same_as_static": same, "prefix_of_static": prefix, "rows_cut_short": int(cut.sum()),
                    "device": jax.devices()[0].device_kind if name != "hf_generate" else "torch cpu"})
  return results


def main(args) -> int:
  results = run(prompts=args.prompts, batch=args.batch, max_new=args.max_new_tokens, loop_share=args.loop_share,
                seed=args.seed, hf=not args.no_hf, repeats=args.repeats, stop_min_run=args.stop_min_run or None)
  for r in results:
    print(json.dumps(r))
  base = results[0]["prompts_per_s"]
  print(json.dumps({"bench": "generate", "summary": {r["mode"]: round(r["prompts_per_s"] / base, 3) for r in results},
                    "note": "prompts/s relative to static batching"}))
  return 0
