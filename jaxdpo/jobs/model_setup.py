"""Builds the policy for a job: from a preset (random init) or a converted checkpoint, sharded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.parallel import sharding as shd
from jaxdpo.models import io, lora, registry
from jaxdpo.models import trainable as trainable_lib
from jaxdpo.errors import ConfigError


@dataclasses.dataclass
class ModelBundle:
  """A model split into its static graph and its (sharded) parameter tree."""

  family: registry.Family
  config: object
  graphdef: object
  params: dict
  param_shardings: dict
  abstract: object  # abstract nnx.State, for restoring
  lora: lora.LoraConfig | None = None  # set when the params hold LoRA adapters (issue 13)


def dtype_of(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ConfigError(f"unknown dtype {name!r} (use float32 or bfloat16)") from e


def attention_impl(name: str, compute_dtype) -> str | None:
  """"" picks cuDNN on GPU for 16-bit compute (cuDNN has no fp32 path) and XLA otherwise."""
  if name:
    return name
  if jax.default_backend() == "gpu" and jnp.dtype(compute_dtype).itemsize == 2:
    return "cudnn"
  return "xla"


def parse_rules(spec: str):
  """"" -> DEFAULT_RULES; "embed=fsdp,mlp=tensor,vocab=,batch=data+fsdp" -> a rules table."""
  if not spec:
    return shd.DEFAULT_RULES
  table = dict(shd.DEFAULT_RULES)
  for item in spec.split(","):
    name, _, axes = item.partition("=")
    axes_t = tuple(a for a in axes.split("+") if a)
    for a in axes_t:
      if a not in shd.MESH_AXES:
        raise ConfigError(f"config.sharding_rules: {item!r} names unknown mesh axis {a!r}")
    if name.strip() == "batch" and axes_t != shd.BATCH_AXES:
      # Batch placement is fixed in several places (host rows, put_batch, the steps' in_shardings,
      # the planner, activation constraints); a different split would be accepted and not used.
      raise ConfigError(f"config.sharding_rules: {item!r}: the batch is always split over "
                        f"{'+'.join(shd.BATCH_AXES)}; other batch= placements are not supported (drop it)")
    table[name.strip()] = axes_t or None
  return tuple(table.items())


def resolve_model(model_cfg):
  """(family, model config) named by `config.model`, without building or loading weights."""
  if model_cfg.checkpoint:
    return io.read_model_meta(model_cfg.checkpoint)
  family = registry.get_family(model_cfg.family)
  if model_cfg.preset not in family.presets:
    raise ConfigError(f"config.model.preset={model_cfg.preset!r} is not a {family.name} preset; "
                     f"known: {sorted(family.presets)}")
  return family, family.presets[model_cfg.preset]()


def setup_model(model_cfg, mesh, rules, *, seed: int, lora_cfg: lora.LoraConfig | None = None) -> ModelBundle:
  """Creates or loads the policy directly into its sharding (never whole on one host).

  With `lora_cfg` enabled, the module gets LoRA adapters (`jaxdpo.models.lora`): the base comes from
  the preset init or the checkpoint as without LoRA, the adapters are initialised (A random, B zero).
  """
  use_lora = lora_cfg is not None and lora_cfg.enabled
  param_dtype = dtype_of(base_dtype(model_cfg, lora_cfg))
  impl = attention_impl(model_cfg.attention_impl, dtype_of(model_cfg.compute_dtype))
  family, cfg = resolve_model(model_cfg)
  build = ((lambda rngs: lora.build(family, cfg, lora_cfg, rngs, param_dtype, impl)) if use_lora
           else (lambda rngs: family.build(cfg, rngs, param_dtype, impl)))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
  p_sh = shd.param_shardings(abstract, rules, mesh)

  def init():
    return nnx.to_pure_dict(nnx.split(build(nnx.Rngs(seed)), nnx.Param)[1])

  if model_cfg.checkpoint:
    base_graph, base_abstract = io.build_abstract(family, cfg, param_dtype, impl)
    base_sh = shd.param_shardings(base_abstract, rules, mesh)
    params = nnx.to_pure_dict(io.load_params(model_cfg.checkpoint, base_abstract, shardings=base_sh,
                                             dtype=param_dtype))
    if use_lora:  # only the adapters are initialised; the unused base init is dead code under jit
      adapters = jax.jit(lambda: lora.split_base(init())[1], out_shardings=lora.split_base(p_sh)[1])()
      params = lora.merge_base(params, adapters)
  else:
    params = jax.jit(init, out_shardings=p_sh)()
  return ModelBundle(family, cfg, graphdef, params, p_sh, abstract, lora_cfg if use_lora else None)


def base_dtype(model_cfg, lora_cfg) -> str:
  """The base parameters' storage dtype: `lora.base_dtype` for a LoRA run when set, else `model.param_dtype`."""
  if lora_cfg is not None and lora_cfg.enabled and lora_cfg.base_dtype:
    return lora_cfg.base_dtype
  return model_cfg.param_dtype


def export_params(bundle: ModelBundle, params):
  """The parameters a finished run exports: with LoRA, the adapters merged into the base kernels."""
  if bundle.lora is None:
    return params
  return jax.jit(lambda p: lora.merged(bundle.graphdef, p))(params)


def export_peft(out_dir: str, bundle: ModelBundle, params, *, base_model: str = "") -> str | None:
  """Writes a LoRA run's adapters as a PEFT adapter (`jaxdpo.models.lora_peft`); single-process runs only."""
  import logging
  if jax.process_count() > 1:
    logging.getLogger("jaxdpo").warning("the PEFT adapter is not written by multi-process runs (not built)")
    return None
  from jaxdpo.models import lora_peft
  out = lora_peft.write_peft(out_dir, bundle.graphdef, jax.device_get(params), bundle.family, bundle.config,
                             base_model=base_model)
  logging.getLogger("jaxdpo").info("PEFT adapter written to %s (peft.PeftModel.from_pretrained(hf_base, dir))", out)
  return out


def trainable_mask(model_cfg, bundle: ModelBundle):
  """The bool tree of trainable params named by `config.model.trainable` (None: all train)."""
  if bundle.lora is not None:  # LoRA: the adapters train, the whole base is frozen
    mask = lora.adapter_mask(bundle.params)
    import logging
    n_all = sum(x.size for x in jax.tree.leaves(bundle.params))
    n_train = sum(x.size for x in jax.tree.leaves(trainable_lib.trainable_part(bundle.params, mask)))
    logging.getLogger("jaxdpo").info("LoRA rank %d: %d adapter parameters train, %d base parameters frozen",
                                     bundle.lora.rank, n_train, n_all - n_train)
    return mask
  spec = model_cfg.trainable
  mask = trainable_lib.mask_of(bundle.params, trainable_lib.predicate(spec, bundle.family), spec)
  if mask is not None:
    import logging
    n_all = sum(x.size for x in jax.tree.leaves(bundle.params))
    n_train = sum(x.size for x in jax.tree.leaves(trainable_lib.trainable_part(bundle.params, mask)))
    logging.getLogger("jaxdpo").info("config.model.trainable=%r: %d of %d parameters train (%d frozen)", spec,
                                     n_train, n_all, n_all - n_train)
  return mask
