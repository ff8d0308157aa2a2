"""Per-device memory plan of a DPO run, made before anything large is allocated.

Two sources, both per device:
  * shapes (`plan_dpo`): the parameter tree from `nnx.eval_shape`, the optimizer state from
    `jax.eval_shape(tx.init, ...)`, each leaf divided by its sharding. Exact for parameters,
    optimizer state and the reference copy; activations are a formula (see
    `estimate_activations`). Nothing is allocated and nothing is compiled.
  * the compiled step (`refine_with_compiled`): XLA's own buffer assignment
    (`compiled.memory_analysis()`), where the backend provides one. It replaces the activation
    estimate with the program's temporaries.

`check` refuses a plan that exceeds the per-device budget, with the changes that would help.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxdpo.models import trainable as trainable_lib
from jaxdpo.parallel import sharding as shd
from jaxdpo.errors import MemoryPlanError  # noqa: F401  (raised here; kept importable from here)

log = logging.getLogger("jaxdpo")

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of one training step.

  Attributes:
    params: the policy's parameters.
    opt_state: optimizer state (AdamW: mu and nu, each the size of the parameters (mu in `optim.mu_dtype`),
      plus counters).
    reference: the frozen reference copy, in the compute dtype (0 for `dpo.reference=cached` or reference-free).
    gradients: one gradient tree over the trainable parameters (eval_shape source; inside `activations` once
      compiled, where XLA counts it among the temporaries).
    activations: estimated saved activations (eval_shape), or the compiled program's temporaries
      and non-donated outputs.
    batch: the step's input batch.
    source: "eval_shape" or "compiled".
    num_devices, fsdp: the mesh, for the advice.
    remat: the run's `train.remat` policy, for the advice.
  """

  params: int
  opt_state: int
  reference: int
  gradients: int
  activations: int
  batch: int
  source: str
  num_devices: int = 1
  fsdp: int = 1
  remat: str = "none"

  @property
  def total(self) -> int:
    return self.params + self.opt_state + self.reference + self.gradients + self.activations + self.batch

  def report(self, limit: int | None = None) -> str:
    """A small table, in GiB per device."""
    act = "activations (estimated)" if self.source == "eval_shape" else "activations + temporaries (compiled)"
    rows = [("parameters", self.params), ("optimizer state", self.opt_state), ("reference", self.reference),
            ("gradients", self.gradients), (act, self.activations), ("batch", self.batch), ("total", self.total)]
    lines = [f"memory plan per device ({self.source}, {self.num_devices} devices, fsdp={self.fsdp}):"]
    lines += [f"  {name:<38s}{fmt_bytes(b):>12s}  ({b} bytes)" for name, b in rows]
    if limit:
      lines.append(f"  {'device budget':<38s}{fmt_bytes(limit):>12s}")
    return "\n".join(lines)


def fmt_bytes(b: int) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if b >= size:
      return f"{b / size:.3f} {unit}"
  return f"{b} B"


def _leaf_bytes(x) -> int:
  """Bytes of the shard one device holds (the whole array when replicated or unsharded)."""
  shape = tuple(x.shape)
  sharding = getattr(x, "sharding", None)
  if sharding is not None:
    shape = sharding.shard_shape(shape)
  return math.prod(shape) * np.dtype(x.dtype).itemsize


def per_device_bytes(tree) -> int:
  """Sum over leaves (arrays or ShapeDtypeStructs with shardings) of one device's shard bytes."""
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying the matching leaves of `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """Shardings of an optax state: parameter-shaped subtrees (mu, nu, ...) follow the parameters.

  This is what `jit(tx.init)` produces by propagation; anything else (step counters) is
  replicated.
  """
  p_def = jax.tree.structure(abstract_params)
  replicated = shd.replicated(mesh)

  def is_param_tree(node):
    try:
      return jax.tree.structure(node) == p_def
    except Exception:  # noqa: BLE001  (non-pytree leaves)
      return False

  return jax.tree.map(lambda node: param_shardings if is_param_tree(node) else replicated,
                      abstract_opt_state, is_leaf=is_param_tree)


def _text_config(model_cfg):
  return getattr(model_cfg, "text", model_cfg)


def kept_per_token_layer(model_cfg, remat_policy: str, *, seq_len: int, compute_bytes: int, tensor: int = 1,
                         xla_attention: bool = True) -> int:
  """Bytes the backward pass keeps per token and decoder layer under a `train.remat` policy.

  In the compute dtype, with D the width, Q = N*H and KV = K*H the query and key/value widths
  and F the MLP width (heads and F split over `tensor`); XLA attention's scores and probabilities
  are fp32, N x T per token (cuDNN keeps its own few statistics instead):
    none            2D (norm inputs) + 2Q (queries, context) + 2KV + 3F (gate, up, gated) + fp32 probs
    dots_saveable   2D (input, o) + 2Q + 2KV + 2F (gate, up) + fp32 scores
    dots_no_batch   2D + Q + 2KV + 2F: the projections, not the attention matmuls
    save_attn       2D + 2Q + 2KV: q, k, v, context, o
    save_qkv_proj   D + Q + 2KV
    full            D: the block input
  (`jaxdpo.models.remat` names what each policy saves; `tests/test_remat_scan.py` checks the order.)
  """
  from jaxdpo.models import remat  # the policy names live with the model code
  remat.check(remat_policy)
  t = _text_config(model_cfg)
  d, n, k, f = t.hidden_size, t.num_heads, t.num_kv_heads, t.intermediate_size
  h = t.head_dim or d // n
  q, kv, f = n * h // tensor, k * h // tensor, f // tensor
  scores = 4 * (n // tensor if n % tensor == 0 else n) * seq_len if xla_attention else 0
  elements, with_scores = {
      "none": (2 * d + 2 * q + 2 * kv + 3 * f, True),
      "dots_saveable": (2 * d + 2 * q + 2 * kv + 2 * f, True),
      "dots_no_batch": (2 * d + q + 2 * kv + 2 * f, False),
      "save_attn": (2 * d + 2 * q + 2 * kv, False),
      "save_qkv_proj": (d + q + 2 * kv, False),
      "full": (d, False),
  }[remat_policy]
  return compute_bytes * elements + (scores if with_scores else 0)


def estimate_activations(model_cfg, *, rows_per_device: int, seq_len: int, compute_bytes: int, tensor: int = 1,
                         logprob_chunk: int = 256, xla_attention: bool = True, remat_policy: str = "none") -> int:
  """Saved activations of the policy's forward pass for the backward pass (text decoder).

  Every layer keeps `kept_per_token_layer` bytes per token for its policy; under remat one layer at
  a time also holds what "none" keeps while its backward pass recomputes it. Chunked log-probs add
  one fp32 chunk of logits (chunk x V) per row. Vision towers and transient buffers are not
  included: this is a floor, not a bound; the compiled plan (`refine_with_compiled`) is the
  accurate one.
  """
  t = _text_config(model_cfg)
  kw = dict(seq_len=seq_len, compute_bytes=compute_bytes, tensor=tensor, xla_attention=xla_attention)
  tokens = rows_per_device * seq_len
  kept = tokens * kept_per_token_layer(model_cfg, remat_policy, **kw) * t.num_layers
  if remat_policy != "none":
    kept += tokens * kept_per_token_layer(model_cfg, "none", **kw)
  logits = rows_per_device * min(logprob_chunk, seq_len) * t.vocab_size * 4
  return kept + logits


@dataclasses.dataclass(frozen=True)
class DPORun:
  """What the planner needs to know about a DPO run (the job builds it from the config).

  Attributes:
    family: the registered model family (`jaxdpo.models.registry.Family`).
    model_cfg: its model config.
    param_dtype, compute_dtype: numpy dtypes of the parameters and of the step's compute.
    attention_impl: the resolved attention implementation ("xla", "cudnn", ...).
    tx: the optax transformation (its state is sized from shapes).
    reference_model: whether a frozen reference copy sits in memory.
    batch_size, grad_accum, seq_len, logprob_chunk: the step's shapes.
    remat, scan_layers: the block plan (`train.remat`, `train.scan_layers`).
    trainable: parameter path -> trainable? (`jaxdpo.models.trainable.predicate`), or None when
      every parameter trains. Gradients and optimizer state are sized over the trainable ones.
  """

  family: Any
  model_cfg: Any
  param_dtype: Any
  compute_dtype: Any
  attention_impl: str
  tx: Any
  reference_model: bool
  batch_size: int
  grad_accum: int
  seq_len: int
  logprob_chunk: int
  trainable: Any = None
  lora: Any = None  # a `jaxdpo.models.lora.LoraConfig` with rank > 0: adapters train, the base is frozen
  remat: str = "none"  # `train.remat`: what the backward pass keeps per layer (`kept_per_token_layer`)
  scan_layers: bool = False  # `train.scan_layers`: the stacked layer copy of each forward (`plan_dpo`)


@functools.lru_cache(maxsize=4)
def _abstract_lora_params(family_name: str, model_cfg, param_dtype, lora_cfg):
  from flax import nnx as nnx_
  from jaxdpo.models import lora, registry
  family = registry.get_family(family_name)
  model = nnx_.eval_shape(lambda: lora.build(family, model_cfg, lora_cfg, nnx_.Rngs(0), param_dtype))
  return nnx_.split(model, nnx_.Param)[1]


@functools.lru_cache(maxsize=4)
def _abstract_params(family_name: str, model_cfg, param_dtype):
  # Building a full-size model abstractly takes seconds; planning several meshes reuses it.
  from jaxdpo.models import io, registry
  return io.build_abstract(registry.get_family(family_name), model_cfg, param_dtype)[1]


def plan_dpo(run: DPORun, mesh, rules=shd.DEFAULT_RULES) -> MemoryPlan:
  """The per-device plan of a DPO step on `mesh`, from shapes only (nothing allocated).

  `rules` are the resolved logical-axis rules: the parameters and the batch are sized with the
  shardings the run will use (a `batch=` override included).
  """
  use_lora = run.lora is not None and run.lora.rank > 0
  if use_lora:  # the base plus adapters; only the adapters train
    from jaxdpo.models import lora
    abstract = _abstract_lora_params(run.family.name, run.model_cfg, run.param_dtype, run.lora)
  else:
    abstract = _abstract_params(run.family.name, run.model_cfg, run.param_dtype)
  p_sh = shd.param_shardings(abstract, rules, mesh)
  params = with_shardings(nnx.to_pure_dict(abstract), p_sh)
  mask = lora.adapter_mask(params) if use_lora else trainable_lib.mask_of(params, run.trainable)
  trained = trainable_lib.trainable_part(params, mask)
  abstract_opt = jax.eval_shape(run.tx.init, trained)
  opt = with_shardings(abstract_opt, opt_state_shardings(abstract_opt, trained,
                                                         trainable_lib.trainable_part(p_sh, mask), mesh))
  param_bytes = per_device_bytes(params)
  has_ref_model = run.reference_model
  data_ways = shd.batch_divisor(mesh, rules)
  pairs_per_device = max(1, run.batch_size // data_ways // max(1, run.grad_accum))
  seq = run.seq_len
  acts = estimate_activations(run.model_cfg, rows_per_device=2 * pairs_per_device, seq_len=seq,
                              compute_bytes=np.dtype(run.compute_dtype).itemsize, tensor=mesh.shape["tensor"],
                              logprob_chunk=run.logprob_chunk, xla_attention=run.attention_impl == "xla",
                              remat_policy=run.remat)
  if run.scan_layers:
    # The scan stacks the decoder layers' parameters (in the compute dtype) inside the step; one
    # forward's stacked copy is live at a time (the policy's replaces its compute-dtype cast).
    acts += _layer_bytes(params, np.dtype(run.compute_dtype).itemsize)
  batch_bytes = 4 * 4 * 2 * seq * max(1, run.batch_size // data_ways)  # 4 int32 [B, 2, T] arrays
  # The reference copy is held in the compute dtype (cast once at load, `jobs.dpo.reference_copy`).
  ref_bytes = per_device_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, run.compute_dtype,
                                                                           sharding=x.sharding), params))
  return MemoryPlan(params=param_bytes, opt_state=per_device_bytes(opt),
                    reference=ref_bytes if has_ref_model else 0, gradients=per_device_bytes(trained),
                    activations=acts,
                    batch=batch_bytes, source="eval_shape", num_devices=mesh.size, fsdp=mesh.shape["fsdp"],
                    remat=run.remat)


def _layer_bytes(params, itemsize: int) -> int:
  """Per-device bytes of the decoder layers' parameters (`layers/...` of a text model,
  `language_model/layers/...` of a VLM; not a vision tower's), at `itemsize` bytes an element."""
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", None) for k in path]
    if keys[:1] == ["layers"] or keys[:2] == ["language_model", "layers"]:
      total += _leaf_bytes(x) // np.dtype(x.dtype).itemsize * itemsize
  return total


def refine_with_compiled(plan: MemoryPlan, compiled) -> MemoryPlan:
  """Replaces the estimates with the compiled step's buffer assignment, when the backend has one.

  `compiled` is `jitted.lower(state, ref, batch).compile()`. Its arguments hold parameters,
  optimizer state, reference and batch; outputs that alias donated arguments cost nothing
  extra; temporaries hold gradients and activations.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (backends without the analysis raise various errors)
    stats = None
  if stats is None:
    return plan
  args = int(stats.argument_size_in_bytes)
  extra_out = max(0, int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes))
  known = plan.params + plan.opt_state + plan.reference
  return dataclasses.replace(plan, gradients=0, activations=int(stats.temp_size_in_bytes) + extra_out,
                             batch=max(0, args - known), source="compiled")


def device_limit(device_memory_gb: float) -> int | None:
  """The per-device budget in bytes: the config's GiB, else the backend's `bytes_limit`, else None."""
  if device_memory_gb < 0:
    return None
  if device_memory_gb > 0:
    return int(device_memory_gb * GIB)
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (CPU and some plugins have no memory stats)
    stats = None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def advice(plan: MemoryPlan) -> list[str]:
  """Config changes that would shrink the plan, most effective first."""
  tips = []
  state = plan.params + plan.opt_state + plan.reference + plan.gradients
  if plan.fsdp < plan.num_devices:
    factor = plan.num_devices // plan.fsdp
    tips.append(f"shard parameters and optimizer state over more devices: --config.mesh.fsdp={plan.num_devices} "
                f"--config.mesh.data=1 (state ~{state / GIB:.2f} GiB now, ~{state / factor / GIB:.2f} GiB then)")
  if plan.reference:
    tips.append(f"precompute the reference log-probs once: --config.dpo.reference=cached "
                f"(frees {plan.reference / GIB:.2f} GiB)")
  if plan.remat != "full":
    tips.append(f"recompute the decoder blocks in the backward pass: --config.train.remat=full (or save_qkv_proj, "
                f"save_attn; now {plan.remat!r}; activations {plan.activations / GIB:.2f} GiB)")
  tips.append(f"shrink activations ({plan.activations / GIB:.2f} GiB): raise --config.train.grad_accum or lower "
              "--config.data.max_length")
  return tips


def check(plan: MemoryPlan, limit: int | None):
  """Raises MemoryPlanError when the plan exceeds `limit` bytes per device (None: no check)."""
  if limit is None or plan.total <= limit:
    return
  tips = "; ".join(advice(plan))
  raise MemoryPlanError(f"the run needs ~{plan.total / GIB:.2f} GiB per device ({plan.source}) but the budget is "
                        f"{limit / GIB:.2f} GiB (config.train.device_memory_gb or the backend's bytes_limit). "
                        f"Try: {tips}\n{plan.report(limit)}")


def report_and_check(plan: MemoryPlan, device_memory_gb: float, *, announce: bool = True) -> MemoryPlan:
  """Logs the plan (process 0; unless `announce` is False, e.g. when `compiled_check` will log the
  refined plan) and refuses it if it cannot fit (the error carries the table)."""
  limit = device_limit(device_memory_gb)
  if announce and jax.process_index() == 0:
    log.info("%s", plan.report(limit))
  check(plan, limit)
  return plan


def abstract_batch(sample: dict, global_batch: int, mesh) -> dict:
  """Global ShapeDtypeStructs of a step's batch, from one host-local collated sample."""
  return {k: jax.ShapeDtypeStruct((global_batch,) + np.shape(v)[1:], np.asarray(v).dtype,
                                  sharding=shd.batch_sharding(mesh, np.ndim(v)))
          for k, v in sample.items()}


def compiled_check(plan: MemoryPlan, step_fn, state, ref, sample: dict, global_batch: int, mesh,
                   device_memory_gb: float) -> MemoryPlan:
  """Compiles the train step ahead of time (the first step reuses the executable), then
  refines, logs and checks the plan with XLA's memory analysis."""
  compiled = step_fn.lower(state, ref, abstract_batch(sample, global_batch, mesh)).compile()
  # The plan is logged once, here: refined by XLA's analysis when the backend gives one.
  return report_and_check(refine_with_compiled(plan, compiled), device_memory_gb)
