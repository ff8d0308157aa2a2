"""A LoRA run's training checkpoint exported for HF (issue 13): `jax-to-hf --peft` and `--merge-lora`.

What `--ckpt` points at: the LoRA run's WORKDIR (its newest checkpoint is used) or one checkpoint of it,
WORKDIR/checkpoints/STEP. The run's `WORKDIR/config.json` names the model (`model.*`) and the adapters
(`lora.*`); the checkpoint's params hold the frozen base and the adapters together, so a preset-initialised
base needs no separate file. (`WORKDIR/model` is already merged, a plain checkpoint: plain `jax-to-hf`
exports it, and `--peft` refuses it: it has no adapters left.)
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxdpo.errors import CheckpointNotFoundError, ConversionError
from jaxdpo.jobs import model_setup
from jaxdpo.models import io, lora


class NoAdaptersError(ConversionError):
  """--peft / --merge-lora given a directory that holds no LoRA adapters."""


def locate(path: str) -> tuple[str, str]:
  """(run WORKDIR, checkpoint step directory) named by --ckpt (a WORKDIR or WORKDIR/checkpoints/STEP)."""
  path = os.path.abspath(path)
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), path
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(f"{path}: no such directory (--ckpt takes a LoRA run's WORKDIR or "
                                  "WORKDIR/checkpoints/STEP)")
  ckpts = os.path.join(path, "checkpoints")
  steps = sorted((int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else [])
  if not steps:
    raise NoAdaptersError(_no_adapters(path))
  return path, os.path.join(ckpts, str(steps[-1]))


def _no_adapters(path: str) -> str:
  why = ("a model checkpoint (a LoRA run's WORKDIR/model is already merged: export it without --peft/--merge-lora)"
         if os.path.exists(os.path.join(path, "jaxdpo_model.json")) else "not a LoRA run's WORKDIR")
  return (f"{path}: no LoRA adapters ({why}); --peft and --merge-lora take a LoRA run's WORKDIR "
          "or WORKDIR/checkpoints/STEP")


def run_config(workdir: str):
  """The run's config (`WORKDIR/config.json`) as a ConfigDict; refuses a run without LoRA."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise NoAdaptersError(_no_adapters(workdir))
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if "lora" not in config or int(config.lora.rank) <= 0:
    raise NoAdaptersError(f"{workdir}: no LoRA adapters (its config.json has lora.rank=0: a full fine-tuning "
                          "run; export WORKDIR/model without --peft/--merge-lora)")
  return config


def load(path: str):
  """(config, family, model config, graphdef, params pure dict with the adapters) of --ckpt `path`, in float32."""
  workdir, step_dir = locate(path)
  config = run_config(workdir)
  family, cfg = model_setup.resolve_model(config.model)
  lora_cfg = lora.from_config(config.lora)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: lora.build(family, cfg, lora_cfg, nnx.Rngs(0), jnp.float32)),
                                 nnx.Param)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=sharding),
                        nnx.to_pure_dict(abstract))
  state_dir = os.path.join(step_dir, "state")
  if not os.path.isdir(state_dir):
    raise CheckpointNotFoundError(f"{step_dir}: not a complete training checkpoint (no state/)")
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=sharding, dtype=jnp.float32), target)
  try:  # the params only (partial restore): the optimizer state is not read
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{step_dir}: its params do not match the model and lora.* of {workdir}/config.json "
                          f"({' '.join(str(e).split())[:300]})") from e
  return config, family, cfg, graphdef, restored["params"]


def write_peft(path: str, out_dir: str, *, overwrite: bool = False) -> str:
  """`jax-to-hf --peft`: adapter_model.safetensors + adapter_config.json, written atomically."""
  from jaxdpo.models import lora_peft
  config, family, cfg, graphdef, params = load(path)
  with io.atomic_dir(out_dir, overwrite=overwrite) as tmp:
    lora_peft.write_peft(tmp, graphdef, params, family, cfg, base_model=config.model.checkpoint)
  return out_dir


def write_merged(path: str, out_dir: str, *, overwrite: bool = False, max_shard_bytes: int = 2 << 30) -> str:
  """`jax-to-hf --merge-lora`: the base with the adapters folded in, as an HF model directory."""
  config, family, cfg, graphdef, params = load(path)
  merged = lora.merged(graphdef, params)
  hf_config = io.source_hf_config(config.model.checkpoint) if config.model.checkpoint else None
  if hf_config is None and family.config_to_hf is not None:
    hf_config = family.config_to_hf(cfg)
  if hf_config is None:
    raise ConversionError(f"{path}: no HF config.json for this {family.name} model (no source config and the "
                          "family cannot derive one)")
  _, abstract = io.build_abstract(family, cfg)
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, merged)
  tok = config.data.tokenizer if "data" in config else ""
  with tempfile.TemporaryDirectory() as meta:  # the model's metadata only; the tensors come from `state`
    with open(os.path.join(meta, "jaxdpo_model.json"), "w") as f:
      json.dump({"family": family.name, "config": io.config_to_dict(cfg)}, f)
    with open(os.path.join(meta, "hf_config.json"), "w") as f:
      json.dump(hf_config, f)
    if tok and os.path.isdir(tok):
      io.copy_tokenizer_files(tok, os.path.join(meta, "tokenizer"))
    return io.jax_to_hf_dir(meta, out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes, params=state)
