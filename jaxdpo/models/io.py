"""Converted checkpoints: build abstract models, save and load parameters, HF round trips.

Layout of a converted checkpoint directory:

  jaxdpo_model.json   {"family": ..., "config": {...}}  the jaxdpo config of the model
  hf_config.json      the source config.json, written back verbatim by jax-to-hf
  params/             the parameter tree (plain nested dict) in orbax: one checkpoint, or parts
                      written a group of tensors at a time (`jaxdpo.models.param_store`)
  tokenizer/          tokenizer / processor files copied from the HF directory, if any

Every directory is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.errors import CheckpointNotFoundError, ConversionError, OutputExistsError
from jaxdpo.models import convert_table, param_store, registry

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "generation_config.json")
# A tokenizer needs at least one of these (transformers finds the rest from them).
TOKENIZER_OWN_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def path_str(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(tree) -> dict[str, Any]:
  """Nested dict -> {"a.b.0.c": leaf}."""
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(flat: dict[str, Any], like):
  """Inverse of `flatten`, using `like` (a tree of the same structure) for the structure."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in leaves_with_path])


def build_abstract(family: registry.Family, cfg, param_dtype=jnp.float32, attention_impl=None):
  """(graphdef, abstract nnx.State of Params) without allocating anything."""
  model = nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0), param_dtype, attention_impl))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def config_to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(family: registry.Family, d: dict):
  fields = {f.name: f for f in dataclasses.fields(family.config_cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConversionError(f"unknown {family.config_cls.__name__} fields: {unknown}")
  return family.config_cls(**{k: _tuplify(v) for k, v in d.items()})


def _tuplify(v):
  if isinstance(v, list):
    return tuple(_tuplify(x) for x in v)
  if isinstance(v, dict):
    return {k: _tuplify(x) for k, x in v.items()}
  return v


def current_umask() -> int:
  """The process umask (os.umask can only be read by setting it, so it is set straight back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(top: str):
  """Gives `top` and everything under it the modes a plain mkdir / open would have.

  `tempfile.mkdtemp` makes 0700 directories, and some writers (safetensors) leave 0600 files;
  on a shared cluster outputs must follow the user's umask (0755 / 0644 with umask 022).
  """
  mask = current_umask()
  dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
  os.chmod(top, dir_mode)
  for root, dirs, files in os.walk(top):
    for name in dirs:
      os.chmod(os.path.join(root, name), dir_mode)
    for name in files:
      path = os.path.join(root, name)
      if not os.path.islink(path):
        os.chmod(path, file_mode)


@contextlib.contextmanager
def atomic_dir(final: str, overwrite: bool = False):
  """Yields a temporary sibling directory that is renamed to `final` only on success."""
  final = os.path.abspath(final)
  if os.path.exists(final) and not overwrite:
    raise OutputExistsError(f"{final} already exists; pass --overwrite to replace it")
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  apply_umask(tmp)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.rename(tmp, final)


def save_params(path: str, params_pure: dict):
  """Writes a plain parameter tree with orbax (path must not exist)."""
  param_store.save_tree(path, params_pure)


def read_model_meta(ckpt_dir: str) -> tuple[registry.Family, Any]:
  meta_path = os.path.join(ckpt_dir, "jaxdpo_model.json")
  if not os.path.exists(meta_path):
    raise CheckpointNotFoundError(f"{ckpt_dir}: not a jaxdpo model checkpoint (no jaxdpo_model.json); "
                                "convert an HF model with `python -m jaxdpo.convert hf-to-jax`")
  with open(meta_path) as f:
    meta = json.load(f)
  family = registry.get_family(meta["family"])
  return family, config_from_dict(family, meta["config"])


def load_params(ckpt_dir: str, abstract_params: nnx.State, shardings=None, dtype=None):
  """Restores the parameter State of a converted checkpoint.

  Args:
    ckpt_dir: converted checkpoint directory.
    abstract_params: the abstract nnx.State (from `build_abstract`).
    shardings: optional pytree of NamedSharding matching the pure dict; arrays are restored
      straight into it, so no host ever holds the full model.
    dtype: optional dtype to restore into.

  Returns:
    nnx.State with concrete arrays.
  """
  pure = nnx.to_pure_dict(abstract_params)
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), pure)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), pure, shardings)
  flat = param_store.restore(os.path.join(ckpt_dir, "params"), flatten(target), param_store.keys_of(pure))
  state = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(state, unflatten_like(flat, pure))
  return state


def load_model(ckpt_dir: str, *, param_dtype=jnp.float32, attention_impl=None, shardings=None):
  """Loads a converted checkpoint: returns (family, config, graphdef, params State)."""
  family, cfg = read_model_meta(ckpt_dir)
  graphdef, abstract = build_abstract(family, cfg, param_dtype, attention_impl)
  params = load_params(ckpt_dir, abstract, shardings=shardings, dtype=param_dtype)
  return family, cfg, graphdef, params


def read_hf_config(hf_dir: str) -> tuple[dict, registry.Family, Any]:
  """(config.json dict, family, jaxdpo config) of an HF checkpoint directory."""
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise convert_table.ConversionError(f"{hf_dir}: no config.json (is this an HF model directory?)")
  with open(cfg_path) as f:
    hf_config = json.load(f)
  family = registry.family_for_hf_config(hf_config, cfg_path)
  return hf_config, family, family.config_from_hf(hf_config)


def load_hf_model(hf_dir: str, *, param_dtype=jnp.float32, attention_impl=None, shardings=None):
  """Loads an HF checkpoint directly into a model, streaming one safetensors shard at a time.

  Args:
    hf_dir: HF model directory (config.json + safetensors).
    param_dtype: parameter dtype; each tensor is cast on the host before placement.
    attention_impl: passed to the model.
    shardings: optional pytree of `jax.sharding.Sharding` matching the parameters' pure dict;
      each tensor is `device_put` into its sharding as soon as it is read, so the host never
      holds more than the current shard.

  Returns:
    (family, config, graphdef, params State).
  """
  _, family, cfg = read_hf_config(hf_dir)
  graphdef, abstract = build_abstract(family, cfg, param_dtype, attention_impl)
  pure = nnx.to_pure_dict(abstract)
  expected = {k: tuple(v.shape) for k, v in flatten(pure).items()}
  flat_shardings = flatten(shardings) if shardings is not None else {}
  place = lambda path, arr: jax.device_put(arr, flat_shardings.get(path))
  flat = convert_table.hf_to_jax(convert_table.iter_hf_tensors(hf_dir), family.rules(cfg), expected,
                                 family.normalize_key(cfg), dtype=np.dtype(param_dtype), place=place)
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, unflatten_like(flat, pure))
  return family, cfg, graphdef, state


def hf_to_jax_dir(hf_dir: str, out_dir: str, *, overwrite: bool = False, dtype=None, tokenizer: str | bool = True,
                  check_tokenizer: Callable[[registry.Family, Any, str], None] | None = None,
                  max_part_bytes: int = 1 << 30) -> str:
  """Converts an HF checkpoint directory into a jaxdpo checkpoint directory, atomically.

  Streams: each safetensors shard is read, converted and written as its own orbax part (split
  further at `max_part_bytes`) before the next is read, so peak host memory is about one shard.

  Args:
    hf_dir: the HF model directory (config.json, safetensors).
    out_dir: the converted checkpoint directory to write.
    overwrite: replace `out_dir` if it exists.
    dtype: optional dtype to store the parameters in.
    tokenizer: where `out_dir/tokenizer/` comes from: True for `hf_dir`'s own tokenizer and
      processor files, a directory to take them from, or False for no tokenizer directory.
      A source without tokenizer files gives no `tokenizer/` (never one holding only
      generation_config.json).
    check_tokenizer: optional `(family, config, tokenizer source) -> None` that raises to refuse
      the source; run after the config audit and before any weight is read or anything written
      (the CLI passes the jobs' own loading check, which lives in `jaxdpo.data`).
    max_part_bytes: the most converted bytes held (and written as one orbax part) at a time.
  """
  hf_config, family, cfg = read_hf_config(hf_dir)
  tok_src = hf_dir if tokenizer is True else (tokenizer or None)
  if tok_src and check_tokenizer is not None:
    check_tokenizer(family, cfg, tok_src)
  _, abstract = build_abstract(family, cfg)
  pure = nnx.to_pure_dict(abstract)
  expected = {k: tuple(v.shape) for k, v in flatten(pure).items()}
  conv = convert_table.Converter(family.rules(cfg), expected, family.normalize_key(cfg), dtype=dtype)
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, "jaxdpo_model.json"), "w") as f:
      json.dump({"family": family.name, "config": config_to_dict(cfg)}, f, indent=2)
    with open(os.path.join(tmp, "hf_config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    param_store.save_parts(os.path.join(tmp, "params"), _converted_groups(hf_dir, conv, max_part_bytes),
                           param_store.keys_of(pure))
    if tok_src:
      copy_tokenizer_files(tok_src, os.path.join(tmp, "tokenizer"), generation_config_from=hf_dir)
  return out_dir


def _converted_groups(hf_dir: str, conv: convert_table.Converter, max_part_bytes: int):
  """Converted tensors, one group per source shard (split at `max_part_bytes`); a group is read only
  when the writer asks for it. Raises the converter's error after the last group (the caller's
  `atomic_dir` then removes everything written)."""
  for shard in convert_table.list_shards(hf_dir):
    group, size = {}, 0
    for key, value in convert_table.iter_shard_tensors(shard):
      got = conv.convert(key, value)
      del value
      if got is None:
        continue
      if group and size + got[1].nbytes > max_part_bytes:
        yield group
        group, size = {}, 0
      group[got[0]] = got[1]
      size += got[1].nbytes
      del got
    if group:
      yield group
    del group
  conv.finish()


def copy_tokenizer_files(src: str, dst: str, *, generation_config_from: str | None = None,
                         only_with_tokenizer: bool = True):
  """Copies the tokenizer / processor files of `src` into `dst`.

  Args:
    src, dst: source and destination directories (`dst` is created when something is copied).
    generation_config_from: the model directory whose generation_config.json wins over `src`'s
      (it belongs to the model, not to the tokenizer).
    only_with_tokenizer: write nothing when `src` has no tokenizer file: generation_config.json
      or a processor config alone would make a tokenizer directory that does not load.
  """
  names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  if only_with_tokenizer and not set(names) & set(TOKENIZER_OWN_FILES):
    return
  os.makedirs(dst, exist_ok=True)
  for n in names:
    shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
  gen = os.path.join(generation_config_from or src, "generation_config.json")
  if os.path.exists(gen):
    shutil.copy2(gen, os.path.join(dst, "generation_config.json"))


def jax_to_hf_dir(ckpt_dir: str, out_dir: str, *, overwrite: bool = False, max_shard_bytes: int = 2 << 30,
                  params: nnx.State | None = None) -> str:
  """Writes an HF directory (config.json, sharded safetensors + index, tokenizer files).

  Streams: the shards are planned from the parameters' shapes, then each is filled by restoring
  (or, for in-memory `params`, `device_get`-ing) only its own tensors, written and dropped, so peak
  host memory is about one shard. Parameters restored from disk are written as float32.
  """
  family, cfg = read_model_meta(ckpt_dir)
  rules = family.rules(cfg)
  if params is None:
    _, abstract = build_abstract(family, cfg)
    pure = nnx.to_pure_dict(abstract)
    keys = param_store.keys_of(pure)
    specs = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in flatten(pure).items()}
    fetch = lambda names: param_store.restore(os.path.join(ckpt_dir, "params"), {k: specs[k] for k in names}, keys)
  else:
    live = flatten(nnx.to_pure_dict(params))
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in live.items()}
    fetch = lambda names: {k: np.asarray(jax.device_get(live[k])) for k in names}
  hf_key = {path: convert_table.hf_key_of(path, rules, family.denormalize_key) for path in specs}
  nbytes = {k: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for k, v in specs.items()}
  # In layer order (not string order: "layers.10" < "layers.2"), so that a shard's tensors come from
  # one or two of the parts `hf-to-jax` wrote.
  shards = _byte_groups(sorted(specs, key=lambda p: param_store.natural_key(hf_key[p])), nbytes, max_shard_bytes)
  hf_config_path = os.path.join(ckpt_dir, "hf_config.json")
  with open(hf_config_path) as f:
    hf_config = json.load(f)
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    weight_map, total = {}, 0
    for i, paths in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      tensors = {}
      for group in _byte_groups(paths, nbytes, max_shard_bytes // 4):  # restores of a quarter shard at most
        fetched = fetch(group)
        for path in group:  # each source tensor is dropped as soon as it is converted
          tensors.update(convert_table.jax_to_hf({path: fetched.pop(path)}, rules, family.denormalize_key))
        del fetched
        param_store.release_host_memory()
      convert_table.write_safetensors(os.path.join(tmp, name), tensors, metadata={"format": "pt"})
      for key in tensors:
        weight_map[key] = name
        total += tensors[key].nbytes
      del tensors
      param_store.release_host_memory()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copy_tokenizer_files(os.path.join(ckpt_dir, "tokenizer"), tmp, only_with_tokenizer=False)
  return out_dir


def _byte_groups(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
  """`names` cut, in order, into runs of at most `limit` bytes (a larger tensor is a run of its own)."""
  groups, current, size = [], [], 0
  for name in names:
    if current and size + nbytes[name] > limit:
      groups.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes[name]
  groups.append(current)
  return groups


def export_model_dir(out_dir: str, family: registry.Family, cfg, params_pure: dict, *, hf_config: dict | None = None,
                     tokenizer_dir: str | None = None) -> str:
  """Writes trained parameters as a converted-checkpoint directory (the input format of every job).

  Training jobs call this at the end, so `DIR/model` of one job is `model.checkpoint` of the
  next. Every process takes part in the orbax save; process 0 writes the metadata and renames
  the finished directory into place.
  """
  from jax.experimental import multihost_utils
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".partial"
  lead = jax.process_index() == 0
  if lead:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxdpo_export_start")
  save_params(os.path.join(tmp, "params"), params_pure)
  if lead:
    with open(os.path.join(tmp, "jaxdpo_model.json"), "w") as f:
      json.dump({"family": family.name, "config": config_to_dict(cfg)}, f, indent=2)
    if hf_config is not None:
      with open(os.path.join(tmp, "hf_config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir:
      copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, "tokenizer"))
    apply_umask(tmp)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxdpo_export_done")
  return out_dir


def source_hf_config(model_checkpoint: str) -> dict | None:
  """The HF config.json carried by a converted checkpoint, if any (so exports stay convertible)."""
  path = os.path.join(model_checkpoint, "hf_config.json") if model_checkpoint else ""
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None
