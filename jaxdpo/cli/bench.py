"""Throughput benchmark of the DPO train step on fixed synthetic workloads.

  python -m jaxdpo.bench --workload uniform-1k [--steps 12] [--reference model|cached] [--mu-dtype bfloat16]
                         [--peer-json peer.jsonl | --run-peer ../shared/bench/trl_dpo_peer.py]
  python -m jaxdpo.bench --workload uniform-1k --analyze   # compile only: FLOPs and memory plan
  python -m jaxdpo.bench --generate [--prompts 64 --batch 8 --max-new-tokens 256 --loop-share 0.1]
  python -m jaxdpo.bench --stages   # memory / time estimates of each full-scale pipeline stage

Workloads follow `shared/bench/README.md` (batch of 8 pairs, sigmoid loss, beta 0.1, bf16
compute, random weights):
  uniform-1k        Qwen2.5-3B text tower, prompt 512, chosen 512, rejected 512
  ocr-2k            same model, prompt U(256, 1280), chosen U(64, 1024), rejected: half a
                    1024-token loop of an 8-token phrase, half U(64, 1024)
  uniform-1k-gemma  Gemma-3-4B text tower, 512 / 512 / 512
  tiny, ocr-tiny    a 64-wide Qwen2 (the peer's `--size tiny`) for CPU smoke runs

Prints one JSON line: seconds per step (mean of the timed steps after warm-up), pairs/s,
useful tokens/s (non-padding prompt+chosen and prompt+rejected tokens), MFU against
`--peak-tflops` (989, H200 dense bf16) with the peer's FLOP formula, peak device memory, and,
when a peer figure for the same workload is given, the ratio ours / peer measured on the same
machine. With `--reference cached` the step runs without a reference model and the precompute
pass (one reference forward per batch) is timed on its own: `ref_precompute_s_per_batch`,
`ref_precompute_pairs_per_s`. The LM head scores each row's completion window
(`completion_window`, the workload's longest completion). Speed is only ever measured here,
never asserted in tests. `--analyze` compiles the full-size step from shapes only and reports its
work and memory plan (`jaxdpo.cli.bench_analyze`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxdpo.data import shared_rows
from jaxdpo.train import optim
from jaxdpo.train import loop as train
from jaxdpo.train import update
from jaxdpo.parallel import sharding as shd
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.objectives import logprobs
from jaxdpo.models import decoder, io, registry, remat
from jaxdpo.models.qwen2_5_vl.config import Qwen2TextConfig, qwen2_5_3b_text


@dataclasses.dataclass(frozen=True)
class Workload:
  family: str
  model: object
  prompt: tuple[int, int]       # (min, max) prompt tokens
  chosen: tuple[int, int]
  rejected: tuple[int, int]
  loop_share: float = 0.0       # share of rejected completions that are a max-length loop
  peer_args: tuple[str, ...] = ()


def _tiny_qwen():
  return Qwen2TextConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, head_dim=16, tie_word_embeddings=True)


def _gemma_text_4b():
  fam = registry.get_family("gemma3_text")
  for name in ("gemma3_4b_text", "gemma3_4b"):
    if name in fam.presets:
      return fam.presets[name]()
  raise KeyError(f"no 4B preset in gemma3_text presets {sorted(fam.presets)}")


WORKLOADS = {
    "uniform-1k": lambda: Workload("qwen2", qwen2_5_3b_text(), (512, 512), (512, 512), (512, 512),
                                   peer_args=("--size", "3b", "--prompt", "512", "--completion", "512")),
    "ocr-2k": lambda: Workload("qwen2", qwen2_5_3b_text(), (256, 1280), (64, 1024), (64, 1024), 0.5,
                               peer_args=("--size", "3b", "--workload", "ocr", "--prompt", "1280",
                                          "--completion", "1024")),
    "uniform-1k-gemma": lambda: Workload("gemma3_text", _gemma_text_4b(), (512, 512), (512, 512), (512, 512),
                                         peer_args=("--size", "gemma4b", "--prompt", "512", "--completion", "512")),
    "tiny": lambda: Workload("qwen2", _tiny_qwen(), (64, 64), (64, 64), (64, 64),
                             peer_args=("--size", "tiny", "--prompt", "64", "--completion", "64")),
    "ocr-tiny": lambda: Workload("qwen2", _tiny_qwen(), (32, 96), (16, 64), (16, 64), 0.5,
                                 peer_args=("--size", "tiny", "--workload", "ocr", "--prompt", "96",
                                            "--completion", "64")),
}


def synthetic_batches(w: Workload, batch: int, n: int, vocab: int, seed: int = 0, layout: str = "shared"):
  """n batches and their useful-token counts (non-padding prompt+chosen and prompt+rejected tokens).

  layout "pairs": the two-row [B, 2, T] layout, T = max prompt + max completion; "shared": one
  row [P | C | R] per pair (`jaxdpo.data.shared_rows`), T = max prompt + max chosen + max
  rejected, K = the longest completion. The same pairs either way (same seed).
  """
  if layout not in shared_rows.LAYOUTS:
    raise ValueError(f"layout {layout!r}; expected one of {shared_rows.LAYOUTS}")
  rng = np.random.default_rng(seed)
  t = w.prompt[1] + max(w.chosen[1], w.rejected[1])
  shape = (shared_rows.round_up(w.prompt[1] + w.chosen[1] + w.rejected[1]),
           shared_rows.round_up(max(w.chosen[1], w.rejected[1])))
  out = []
  for _ in range(n):
    b = {k: np.zeros((batch, 2, t), np.int32) for k in step_lib.PAIR_KEYS}
    useful = 0
    prompts = []
    for i in range(batch):
      p = int(rng.integers(w.prompt[0], w.prompt[1] + 1))
      c = int(rng.integers(w.chosen[0], w.chosen[1] + 1))
      loop = rng.random() < w.loop_share
      r = w.rejected[1] if loop else int(rng.integers(w.rejected[0], w.rejected[1] + 1))
      prompt = rng.integers(0, vocab, p)
      prompts.append(p)
      phrase = rng.integers(0, vocab, 8)
      comps = (rng.integers(0, vocab, c), np.resize(phrase, r) if loop else rng.integers(0, vocab, r))
      for j, comp in enumerate(comps):
        seq = np.concatenate([prompt, comp])
        b["input_ids"][i, j, :len(seq)] = seq
        b["segment_ids"][i, j, :len(seq)] = 1
        b["positions"][i, j, :len(seq)] = np.arange(len(seq))
        b["loss_mask"][i, j, p:len(seq)] = 1
        useful += len(seq)
    if layout == "shared":
      b = shared_rows.from_pairs(b, prompts, length=shape[0], slots=shape[1])
    out.append((b, useful))
  return out


def model_flops_per_token(n_params: int, n_embed: int, cfg, seq: int) -> float:
  """The peer's formula: 2·non-embedding params + 2·V·D (LM head) + 2·L·T·D (causal attention)."""
  d, layers = cfg.hidden_size, cfg.num_layers
  return 2 * (n_params - n_embed) + 2 * cfg.vocab_size * d + 2 * layers * seq * d


TINY = ("tiny", "ocr-tiny")
GRAD_DTYPES = ("param", "compute")
# Micro-batches of the full-size workloads (`--grad-accum 0` = this): one pair per micro-batch, so a remat policy that
# keeps every projection output (no matmul recomputed) holds one pair's activations, not eight (BUILD_NOTES "Fast step").
DEFAULT_GRAD_ACCUM = 8
# Gradients of the compute-dtype copy: same values, and micro-batch gradients leave the backward in bf16 (summed in fp32).
DEFAULT_GRAD_DTYPE = "compute"


def grad_accum_for(workload: str, batch: int, grad_accum: int) -> int:
  """`--grad-accum`: 0 picks DEFAULT_GRAD_ACCUM for the full-size workloads when it divides the batch, else 1."""
  if grad_accum:
    return grad_accum
  return DEFAULT_GRAD_ACCUM if workload not in TINY and batch % DEFAULT_GRAD_ACCUM == 0 else 1
# Keep every projection output, recompute only norms, activations and the attention core: no matmul is computed
# twice (`full` adds one forward of every block, work_ratio 0.905 -> 0.789 on uniform-1k), and with one pair per
# micro-batch (DEFAULT_GRAD_ACCUM) the kept outputs are one pair's (BUILD_NOTES "Fast step": the figures).
DEFAULT_REMAT = "dots_no_batch"
# bf16 first moments (optim.mu_dtype): 5.7 GiB less state for Qwen2.5-3B.
DEFAULT_MU_DTYPE = "bfloat16"


def block_plan(workload: str, remat_policy: str, scan_layers: str) -> decoder.BlockPlan:
  """The bench's block plan: `--scan-layers auto` scans the full-size workloads and not the tiny ones
  (a 2-layer model has nothing to gain from a loop)."""
  scan = scan_layers == "on" or (scan_layers == "auto" and workload not in TINY)
  return decoder.BlockPlan(remat=remat_policy, scan=scan)


STACKED_CHOICES = ("auto", "on", "off")


def stacked_flags(blocks: decoder.BlockPlan, params_stacked: str, ref_stacked: str) -> tuple[bool, bool]:
  """(policy state stacked, live reference stacked) from `--params-stacked` / `--ref-stacked`.

  auto: the policy's params (and so its gradients and optimizer state) are held stacked when the
  layers are scanned, and the reference is stacked like the policy. Stacking needs the scan (it
  is the layout the scan reads), so "on" without it is refused.
  """
  for name, flag in (("--params-stacked", params_stacked), ("--ref-stacked", ref_stacked)):
    if flag not in STACKED_CHOICES:
      raise ValueError(f"{name} {flag!r}; expected one of {STACKED_CHOICES}")
    if flag == "on" and not blocks.scan:
      raise ValueError(f"{name} on needs the layer scan (--scan-layers on): stacked layers are what the scan reads")
  params = params_stacked == "on" or (params_stacked == "auto" and blocks.scan)
  ref = ref_stacked == "on" or (ref_stacked == "auto" and params)
  return params, ref


def stack_on_device(graphdef, tree, shardings):
  """(`decoder.stack_params(graphdef, tree)` made on device, its shardings): each stacked leaf is
  sharded as its layers were, after a leading layer axis on no mesh axis (`sharding.stacked`)."""
  out_sh = jax.eval_shape(lambda t: decoder.stack_params(graphdef, t), tree).like(shardings, shd.stacked)
  return jax.jit(lambda t: decoder.stack_params(graphdef, t), out_shardings=out_sh)(tree), out_sh


def completion_window(w: Workload) -> int:
  """The step's static LM-head window for a workload: its longest completion (`logprobs.window_for`)."""
  return logprobs.window_for(max(w.chosen[1], w.rejected[1]), w.prompt[1] + max(w.chosen[1], w.rejected[1]))


def grad_dtype_of(name: str, compute_dtype):
  """`--grad-dtype`: "param" differentiates the fp32 params (gradients in their dtype), "compute" their
  compute-dtype copy (`update.make_train_step(grad_dtype=...)`)."""
  if name not in GRAD_DTYPES:
    raise ValueError(f"grad dtype {name!r}; expected one of {GRAD_DTYPES}")
  return None if name == "param" else jnp.dtype(compute_dtype)


def optim_config(mu_dtype: str = "") -> ConfigDict:
  """The bench's AdamW settings (constant lr, clipping at 1, as the peer)."""
  return ConfigDict(dict(lr=1e-6, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                         weight_decay=0.0, max_grad_norm=1.0, mu_dtype=mu_dtype))


def run(workload: str, *, steps: int, warmup: int, batch: int, reference: str, param_dtype: str,
        compute_dtype: str, chunk: int, peak_tflops: float, blocks: decoder.BlockPlan = decoder.BlockPlan(),
        mu_dtype: str = "", layout: str = "shared", grad_accum: int = 1, grad_dtype: str = "param",
        params_stacked: str = "off", ref_stacked: str = "off") -> dict:
  w = WORKLOADS[workload]()
  fam = registry.get_family(w.family)
  cfg = w.model
  mesh = shd.make_mesh({"data": -1} if batch % len(jax.devices()) == 0 else {"data": 1})
  pdt, cdt = jnp.dtype(param_dtype), jnp.dtype(compute_dtype)
  impl = "cudnn" if jax.default_backend() == "gpu" and cdt.itemsize == 2 else "xla"
  graphdef, abstract = io.build_abstract(fam, cfg, pdt, impl)
  p_sh = shd.param_shardings(abstract, shd.DEFAULT_RULES, mesh)
  from flax import nnx
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(fam.build(cfg, nnx.Rngs(0), pdt, impl), nnx.Param)[1]),
                   out_shardings=p_sh)()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_embed = cfg.vocab_size * cfg.hidden_size
  params_stacked, ref_stacked = stacked_flags(blocks, params_stacked, ref_stacked)
  tx, schedule = optim.make_optimizer(optim_config(mu_dtype), steps + warmup)
  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), compute_dtype=cdt, logprob_chunk=chunk,
                             blocks=blocks, completion_window=completion_window(w), grad_accum=grad_accum)
  batches = synthetic_batches(w, batch, steps + warmup, cfg.vocab_size, layout=layout)
  ref, ref_sh, precompute = None, None, {}
  if reference == "model":  # held in the compute dtype, cast once here, as the DPO job holds it
    ref = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cdt), p), out_shardings=p_sh)(params)
    ref_sh = p_sh
    if ref_stacked:  # its scanned layers stacked once, here (decoder.StackedParams)
      ref, ref_sh = stack_on_device(graphdef, ref, p_sh)
  if params_stacked:  # the policy's train state (params, gradients, AdamW moments) over stacked layers
    params, _ = stack_on_device(graphdef, params, p_sh)
  state = {"step": train.scalar_state(0, mesh), "params": params, "opt_state": train.init_opt_state(tx, params, mesh)}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  if ref is None:  # cached: reference log-probs computed beforehand, timed on their own, outside the step's loop
    batches, precompute = _precompute(graphdef, scfg, params, batches, mesh, warmup)
  step_fn = update.make_train_step(step_lib.objective(graphdef, scfg), tx, mesh, state_sh,
                                   ref_sh, schedule, grad_accum=scfg.grad_accum,
                                   grad_dtype=grad_dtype_of(grad_dtype, cdt))
  times, first_step_s = [], None
  for i, (b, _) in enumerate(batches):
    b = shd.put_batch(b, mesh)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, ref, b)
    jax.block_until_ready(metrics)
    if i == 0:
      first_step_s = time.perf_counter() - t0  # compile + one step
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  sec = float(np.mean(times))
  useful = float(np.mean([u for _, u in batches[warmup:]]))
  seq = w.prompt[1] + max(w.chosen[1], w.rejected[1])
  flops = useful * model_flops_per_token(n_params, n_embed, cfg, seq) * (3 + (1 if reference == "model" else 0))
  stats = jax.devices()[0].memory_stats() or {}
  return {"impl": "jaxdpo", "workload": workload, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "batch": batch, "reference": reference, "layout": layout,
          "param_dtype": param_dtype, "compute_dtype": compute_dtype, "remat": blocks.remat, "scan_layers": blocks.scan,
          "params": n_params, "step_s_mean": sec,
          "steps_timed": len(times), "first_step_s": first_step_s, "pairs_per_s": batch / sec, "tokens_per_s": useful / sec,
          "mfu_vs_peak": flops / sec / (peak_tflops * 1e12),
          "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 2**30 or None, "loss": float(metrics["loss"]),
          "completion_window": scfg.completion_window, "mu_dtype": mu_dtype or param_dtype,
          "grad_accum": grad_accum, "grad_dtype": grad_dtype, "params_stacked": params_stacked,
          "ref_stacked": ref_stacked and ref is not None,
          **precompute}


def _precompute(graphdef, scfg, params, batches, mesh, warmup: int):
  """`--reference cached`: the reference log-probs of every batch (the DPO job's precompute pass,
  `jobs.dpo.precompute_reference`, one batch at a time), timed per batch after `warmup` batches."""
  fn = jax.jit(lambda p, b: step_lib.pair_logps(graphdef, p, b, scfg)[0])
  out, times = [], []
  for i, (b, u) in enumerate(batches):
    t0 = time.perf_counter()
    logps = np.asarray(jax.device_get(fn(params, shd.put_batch(b, mesh))))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    out.append(({**b, "ref_logps": logps}, u))
  sec = float(np.mean(times)) if times else None
  return out, {"ref_precompute_s_per_batch": sec, "ref_precompute_pairs_per_s": len(batches[0][0]["input_ids"]) / sec
               if sec else None}


def _peer(args, workload: str) -> dict | None:
  if args.peer_json:
    with open(args.peer_json) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    # The peer file is produced on the same machine; pick the row for this workload.
    for row in rows:
      if row.get("jaxdpo_workload", workload) == workload:
        return row
    return None
  if args.run_peer:
    w = WORKLOADS[workload]()
    cmd = [sys.executable, args.run_peer, *w.peer_args, "--batch", str(args.batch), "--steps",
           str(args.steps + 2), "--grad-ckpt", "0", "--precompute-ref", "1" if args.reference == "cached" else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)
  return None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jaxdpo.bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--reference", choices=("model", "cached"), default="model")
  ap.add_argument("--param-dtype", default="float32")
  ap.add_argument("--compute-dtype", default="bfloat16")
  ap.add_argument("--logprob-chunk", type=int, default=256)
  ap.add_argument("--remat", choices=remat.POLICIES, default=DEFAULT_REMAT,
                  help="decoder-block remat policy (train.remat); see jaxdpo.models.remat")
  ap.add_argument("--scan-layers", choices=("auto", "on", "off"), default="auto",
                  help="scan over the decoder layers (train.scan_layers); auto: on except for the tiny workloads")
  ap.add_argument("--grad-accum", type=int, default=0,
                  help="micro-batches per optimizer step (train.grad_accum); the batch of pairs stays --batch; "
                       f"0: {DEFAULT_GRAD_ACCUM} for the full-size workloads, 1 for the tiny ones")
  ap.add_argument("--grad-dtype", choices=GRAD_DTYPES, default=DEFAULT_GRAD_DTYPE,
                  help="param: differentiate the fp32 params; compute: their compute-dtype copy (gradients leave the "
                       "backward in bf16, micro-batch sums in fp32; the same values, see update.make_train_step)")
  ap.add_argument("--params-stacked", choices=STACKED_CHOICES, default="auto",
                  help="hold the policy's scanned layers stacked in the train state (params, gradients and AdamW "
                       "state over [L, ...] leaves, decoder.StackedParams) instead of stacking them in every step; "
                       "auto: on with the layer scan")
  ap.add_argument("--ref-stacked", choices=STACKED_CHOICES, default="auto",
                  help="hold the live reference's scanned layers stacked once at load (decoder.StackedParams) "
                       "instead of stacking them in every step; auto: as --params-stacked")
  ap.add_argument("--mu-dtype", default=DEFAULT_MU_DTYPE,
                  help="AdamW first-moment dtype (optim.mu_dtype); '' = the param dtype")
  ap.add_argument("--layout", choices=shared_rows.LAYOUTS, default="shared",
                  help="pair layout: shared = one row [prompt | chosen | rejected] per pair (the prompt computed "
                       "once); pairs = two rows per pair")
  ap.add_argument("--peak-tflops", type=float, default=989.0)
  ap.add_argument("--peer-json", help="JSON lines printed by the peer script on this machine")
  ap.add_argument("--run-peer", help="path of shared/bench/trl_dpo_peer.py, to run it here first")
  ap.add_argument("--suite", action="store_true",
                  help="jaxdpo and the peer (--run-peer) on every workload of --workloads, each in its own process; "
                       "one JSON line per run and a ratio table (jaxdpo.cli.bench_suite)")
  ap.add_argument("--workloads", default="uniform-1k,ocr-2k,uniform-1k-gemma",
                  help="--suite: comma-separated workloads")
  ap.add_argument("--run-timeout", type=float, default=300.0, help="--suite: seconds allowed per run")
  ap.add_argument("--analyze", action="store_true",
                  help="AOT-compile the step without allocating; print xla_flops, useful_flops, work_ratio, "
                       "planned_peak_gb, compile_s")
  ap.add_argument("--target", choices=("backend", "h200"), default="backend",
                  help="--analyze: also compile the step for this accelerator without one (XLA's deviceless GPU "
                       "compile, jaxdpo.parallel.deviceless) and take planned_peak_gb from its plan; needs the "
                       "CUDA plugin of this jax (see that module)")
  ap.add_argument("--generate", action="store_true",
                  help="generation throughput: static batching vs row refill vs refill + stop_on_loop, and HF "
                       "generate, on a tiny random Qwen2 with --loop-share looping prompts (jaxdpo.cli.bench_generate)")
  ap.add_argument("--prompts", type=int, default=64, help="--generate: prompts in the workload")
  ap.add_argument("--max-new-tokens", type=int, default=256, help="--generate: token limit per prompt")
  ap.add_argument("--loop-share", type=float, default=0.1, help="--generate: share of looping prompts")
  ap.add_argument("--repeats", type=int, default=1, help="--generate: timed runs per mode (the best is kept)")
  ap.add_argument("--seed", type=int, default=0, help="--generate: model and prompt seed")
  ap.add_argument("--no-hf", action="store_true", help="--generate: skip transformers' generate")
  ap.add_argument("--stages", action="store_true",
                  help="memory and time estimates of every full-scale pipeline stage (jaxdpo.cli.bench_stages)")
  ap.add_argument("--families", default="nanonets_ocr2_3b,qwen2_5_vl_3b,gemma3_4b", help="--stages: models")
  ap.add_argument("--json", action="store_true", help="--stages: one JSON line per row instead of the table")
  ap.add_argument("--stop-min-run", type=int, default=0,
                  help="--generate: generate.stop_on_loop_min_run, tokens a loop must cover before its row is cut "
                       "(0 = the default, two tail windows)")
  args = ap.parse_args(argv)
  if args.stages:
    from jaxdpo.cli import bench_stages
    return bench_stages.main(args.families, args.json)
  if args.generate:
    from jaxdpo.cli import bench_generate
    return bench_generate.main(args)
  if args.suite:
    from jaxdpo.cli import bench_suite
    names = tuple(n.strip() for n in args.workloads.split(",") if n.strip())
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
      ap.error(f"--workloads: unknown {unknown}; choose from {sorted(WORKLOADS)}")
    bench_suite.run_suite(bench_suite.SuiteConfig(
        workloads=names, steps=args.steps, warmup=args.warmup, batch=args.batch, reference=args.reference,
        peer_script=args.run_peer, timeout_s=args.run_timeout,
        extra_args=("--param-dtype", args.param_dtype, "--compute-dtype", args.compute_dtype,
                    "--logprob-chunk", str(args.logprob_chunk), "--peak-tflops", str(args.peak_tflops),
                    "--remat", args.remat, "--scan-layers", args.scan_layers, "--mu-dtype", args.mu_dtype,
                    "--layout", args.layout, "--grad-accum", str(args.grad_accum), "--grad-dtype", args.grad_dtype,
                    "--params-stacked", args.params_stacked, "--ref-stacked", args.ref_stacked)))
    return 0
  blocks = block_plan(args.workload, args.remat, args.scan_layers)
  args.grad_accum = grad_accum_for(args.workload, args.batch, args.grad_accum)
  if args.analyze:
    from jaxdpo.cli import bench_analyze
    from jaxdpo.parallel import deviceless
    try:
      result = bench_analyze.analyze(args.workload, batch=args.batch, reference=args.reference,
                                     param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                                     chunk=args.logprob_chunk, blocks=blocks, mu_dtype=args.mu_dtype,
                                     layout=args.layout, grad_accum=args.grad_accum,
                                     grad_dtype=args.grad_dtype, params_stacked=args.params_stacked,
                                     ref_stacked=args.ref_stacked,
                                     target=args.target)
    except deviceless.DevicelessUnavailable as e:
      print(f"error: --target {args.target}: {e}", file=sys.stderr)
      return 2
    print(json.dumps(result))
    return 0
  result = run(args.workload, steps=args.steps, warmup=args.warmup, batch=args.batch, reference=args.reference,
               param_dtype=args.param_dtype, compute_dtype=args.compute_dtype, chunk=args.logprob_chunk,
               peak_tflops=args.peak_tflops, blocks=blocks, mu_dtype=args.mu_dtype, layout=args.layout,
               grad_accum=args.grad_accum, grad_dtype=args.grad_dtype, params_stacked=args.params_stacked,
               ref_stacked=args.ref_stacked)
  peer = _peer(args, args.workload)
  if peer:
    result["peer"] = peer.get("peer")
    result["peer_pairs_per_s"] = peer.get("pairs_per_s")
    result["speedup_vs_peer"] = result["pairs_per_s"] / peer["pairs_per_s"] if peer.get("pairs_per_s") else None
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
