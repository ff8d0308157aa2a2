"""`python -m jaxdpo.bench --workload W --analyze`: the work and memory of one full-size step.

The train step is compiled ahead of time on the current backend from shapes only
(`ShapeDtypeStruct`s for parameters, optimizer state, reference and batch), so nothing the size
of the model is allocated. One JSON line reports:

  xla_flops        XLA's cost analysis of the step with every loop unrolled: the fused LM head's
                   chunk loops (its forward, and its custom-VJP backward, which the step's gradient
                   traces into the same module; `StepConfig.logprob_unroll`) and, with
                   `--scan-layers`, the layer scans (`BlockPlan.unroll`), both the same values. XLA's
                   `HloCostAnalysis` counts a while-loop body once, whatever its trip count, so the
                   count is made on that unrolled program while compile_s and the memory plan come
                   from the real (rolled) one. The head runs on each row's completion window
                   (`bench.completion_window`), as the bench and the job run it. The count is taken
                   on the lowered (pre-optimisation) module: remat recomputation is already explicit
                   there, and no second full compile is needed. `loops_in_count` is the number of
                   while loops left in the counted module (0: the count covers every iteration).
  useful_flops     `shared/bench/README.md`'s formula, on the useful tokens of the batches the
                   bench times (same seed): tokens x (2 non-embedding params + 2VD + 2LTD) x 4
                   (policy fwd+bwd, reference fwd), x 3 with a cached reference.
  work_ratio       xla_flops / useful_flops.
  planned_peak_gb  per device, from a compiled step's buffer assignment (arguments + outputs not
                   aliased to donated arguments + temporaries), with the breakdown. `--target h200`:
                   the step compiled for an NVIDIA H200 by XLA's GPU compiler without a GPU
                   (`jaxdpo.parallel.deviceless`; cuDNN attention, as the bench runs there), the
                   current backend's plan then in `backend_plan`. Without a target, the current
                   backend's plan; on CPU that overstates a GPU's (the CPU runs bf16 matmuls in fp32
                   and keeps fp32 copies of the bf16 weights). `planned_for` says which.
  compile_s        seconds to trace, lower and compile the step for the current backend (the real
                   program: chunk loop and layer scans rolled); `target_compile_s` the same for the
                   target. `compile_cpu_s`: the CPU seconds of the same span, all
                   threads (on a shared box the wall time mostly measures the other jobs).
  settings         batch, dtypes, reference mode, chunk, remat policy, layer scan, devices, backend.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.models import decoder, io, registry
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import optim, update

GB = 2**30  # GiB, as the bench's peak_mem_gb


def useful_flops(workload, *, batch: int, reference: str, n_params: int, steps: int = 10, warmup: int = 2) -> float:
  """README useful FLOPs per step: mean useful tokens of the timed batches x model FLOPs per token."""
  from jaxdpo.cli import bench
  cfg = workload.model
  batches = bench.synthetic_batches(workload, batch, warmup + steps, cfg.vocab_size, layout="pairs")  # counts only
  tokens = float(np.mean([u for _, u in batches[warmup:]]))
  seq = workload.prompt[1] + max(workload.chosen[1], workload.rejected[1])
  per_token = bench.model_flops_per_token(n_params, cfg.vocab_size * cfg.hidden_size, cfg, seq)
  return tokens * per_token * (3 + (1 if reference == "model" else 0))


def _stacked(graphdef, tree, shardings):
  """Abstract `decoder.stack_params(graphdef, tree)` carrying its shardings (`bench.stack_on_device`)."""
  out = jax.eval_shape(lambda t: decoder.stack_params(graphdef, t), tree)
  sh = out.like(shardings, shd.stacked)
  return memory.with_shardings(out, sh), sh


def _abstract_state(abstract_params, tx, mesh, graphdef, stacked: bool):
  p_sh = shd.param_shardings(abstract_params, shd.DEFAULT_RULES, mesh)
  params = memory.with_shardings(nnx.to_pure_dict(abstract_params), p_sh)
  if stacked:  # the policy's state over stacked layers (`bench --params-stacked`)
    params, p_sh = _stacked(graphdef, params, p_sh)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt = memory.with_shardings(abstract_opt, memory.opt_state_shardings(abstract_opt, params, p_sh, mesh))
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))
  return {"step": step, "params": params, "opt_state": opt}, p_sh


def analyze(workload: str, *, batch: int, reference: str, param_dtype: str, compute_dtype: str, chunk: int,
            compile: bool = True, blocks: decoder.BlockPlan = decoder.BlockPlan(), count_flops: bool = True,
            mu_dtype: str = "", layout: str = "shared", grad_accum: int = 1, grad_dtype: str = "param",
            params_stacked: str = "off", ref_stacked: str = "off", target: str = "backend") -> dict:
  """Compiles the full-size step from shapes and returns the fields in the module docstring.

  With `compile=False` only the FLOP count is made (lowering only; no memory plan, no compile_s);
  with `count_flops=False` only the memory plan and compile_s (e.g. one compile per remat policy).
  `target="h200"` also compiles the step for an NVIDIA H200 without one (`parallel.deviceless`), with
  the attention the bench runs there (cuDNN), and takes `planned_peak_gb` from that plan; the CPU
  plan stays in the output as `backend_plan`.
  """
  from jaxdpo.cli import bench
  w = bench.WORKLOADS[workload]()
  fam, cfg = registry.get_family(w.family), w.model
  pdt, cdt = jnp.dtype(param_dtype), jnp.dtype(compute_dtype)
  params_stacked, ref_stacked = bench.stacked_flags(blocks, params_stacked, ref_stacked)
  tx, schedule = optim.make_optimizer(bench.optim_config(mu_dtype), 12)
  sample = bench.synthetic_batches(w, 1, 1, cfg.vocab_size, layout=layout)[0][0]
  if reference == "cached":
    sample["ref_logps"] = np.zeros((1, 2), np.float32)

  def program(devices, impl):
    """(lower(step config), abstract state, abstract reference) of the step on one device."""
    mesh = shd.make_mesh({"data": 1}, devices)  # the bench's settings on one device (one H200)
    graphdef, abstract = io.build_abstract(fam, cfg, pdt, impl)
    state, _ = _abstract_state(abstract, tx, mesh, graphdef, params_stacked)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    ref, ref_sh = None, None
    if reference == "model":  # held in the compute dtype, as the bench holds it
      p_sh = shd.param_shardings(abstract, shd.DEFAULT_RULES, mesh)
      ref = memory.with_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cdt),
                                               nnx.to_pure_dict(abstract)), p_sh)
      ref_sh = p_sh
      if ref_stacked:  # stacked once at load (`decoder.StackedParams`)
        ref, ref_sh = _stacked(graphdef, ref, p_sh)
    batch_sds = memory.abstract_batch(sample, batch, mesh)

    def lowered(cfg_):
      step_fn = update.make_train_step(step_lib.objective(graphdef, cfg_), tx, mesh, state_sh,
                                       ref_sh, schedule, grad_accum=cfg_.grad_accum,
                                       grad_dtype=bench.grad_dtype_of(grad_dtype, cdt))
      return step_fn.lower(state, ref, batch_sds)
    return lowered, state, ref, mesh

  scfg = step_lib.StepConfig(loss=losses.DPOLossConfig(beta=0.1), compute_dtype=cdt, logprob_chunk=chunk,
                             blocks=blocks, completion_window=bench.completion_window(w), grad_accum=grad_accum)
  impl = "cudnn" if jax.default_backend() == "gpu" and cdt.itemsize == 2 else "xla"
  lowered, state, ref, mesh = program(None, impl)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  plan = {}
  if compile:
    plan = _plan(lambda: lowered(scfg), state, ref)
    if target != "backend":
      from jaxdpo.parallel import deviceless
      gpu_impl = "cudnn" if cdt.itemsize == 2 else "xla"
      gpu_lowered, gpu_state, gpu_ref, _ = program(deviceless.devices(target), gpu_impl)
      with deviceless.compiling_for(target):
        gpu = _plan(lambda: gpu_lowered(scfg), gpu_state, gpu_ref)
      plan = {"planned_peak_gb": gpu["planned_peak_gb"], "planned_gb": gpu["planned_gb"],
              "planned_for": f"{target} (XLA GPU compiler, deviceless; attention {gpu_impl})",
              "target_compile_s": gpu["compile_s"], "target_compile_cpu_s": gpu["compile_cpu_s"],
              "compile_s": plan["compile_s"], "compile_cpu_s": plan["compile_cpu_s"],
              "backend_plan": {"planned_peak_gb": plan["planned_peak_gb"], "planned_gb": plan["planned_gb"],
                               "attention_impl": impl}}
    else:
      plan["planned_for"] = f"{jax.default_backend()} backend (attention {impl})"
  useful = useful_flops(w, batch=batch, reference=reference, n_params=n_params)
  work = {}
  if count_flops:
    # Counted in one micro-batch: micro-batches split the rows, so the matmuls (and FLOPs) are the same, and
    # the accumulation loop would otherwise be counted once (XLA counts a loop body once).
    counted = lowered(dataclasses.replace(scfg, logprob_unroll=True, blocks=dataclasses.replace(blocks, unroll=True),
                                          grad_accum=1))
    xla_flops = float(counted.cost_analysis()["flops"])
    work = {"xla_flops": xla_flops, "work_ratio": xla_flops / useful,
            "loops_in_count": counted.as_text().count("stablehlo.while")}
  return {"impl": "jaxdpo", "workload": workload, "analyze": True, **work, "useful_flops": useful, **plan,
          "params": n_params,
          "settings": {"batch": batch, "reference": reference, "param_dtype": param_dtype,
                       "compute_dtype": compute_dtype, "logprob_chunk": chunk, "attention_impl": impl, "layout": layout,
                       "remat": blocks.remat, "scan_layers": blocks.scan,
                       "completion_window": scfg.completion_window, "mu_dtype": mu_dtype or param_dtype,
                       "grad_accum": grad_accum, "grad_dtype": grad_dtype,
                       "params_stacked": params_stacked, "ref_stacked": ref_stacked and reference == "model",
                       "devices": mesh.size, "backend": jax.default_backend(), "target": target}}


def _plan(lower, state, ref) -> dict:
  """Traces, lowers (`lower()`) and compiles the step; its buffer assignment (GiB) and compile times."""
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = lower().compile()
  compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  stats = compiled.memory_analysis()
  args, temp = int(stats.argument_size_in_bytes), int(stats.temp_size_in_bytes)
  extra_out = max(0, int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes))
  del compiled
  return {"planned_peak_gb": (args + extra_out + temp) / GB,
          "planned_gb": {"arguments": args / GB, "outputs_not_aliased": extra_out / GB, "temporaries": temp / GB,
                         "params": memory.per_device_bytes(state["params"]) / GB,
                         "opt_state": memory.per_device_bytes(state["opt_state"]) / GB,
                         "reference": (memory.per_device_bytes(ref) if ref is not None else 0) / GB},
          "compile_s": compile_s, "compile_cpu_s": compile_cpu_s}
