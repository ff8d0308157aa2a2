"""Reference log-probs on disk: `config.job="ref_logps"` writes them, `dpo.reference=cache:PATH` reads them.

The file is JSON:
  {"format": 1, "checkpoint": ID, "settings": {...},
   "records": [{"where": "file:line", "key": SHA256, "logps": [chosen, rejected]}, ...]}
`key` hashes what the log-probs depend on in a record once tokenized: its token ids (prompt,
chosen, rejected) and the bytes of each of its images. `checkpoint` identifies the reference
weights (a SHA-256 over the checkpoint directory's files, or the preset, seed and dtype of a
randomly initialised model); `settings` are the other inputs of the values (compute dtype,
LD-DPO's ld_alpha, soft cap). A DPO run uses the cache only when all of them match, and refuses
it otherwise, naming the checkpoint, the setting, or the first record without a cached value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from jaxdpo.data import records
from jaxdpo.errors import ConfigError, DataError

FORMAT = 1
PREFIX = "cache:"
FILE_NAME = "ref_logps.json"


def cache_path(reference: str) -> str | None:
  """PATH of `dpo.reference="cache:PATH"`, else None."""
  if not reference.startswith(PREFIX):
    return None
  path = reference[len(PREFIX):]
  if not path:
    raise ConfigError(f"config.dpo.reference={reference!r}: expected cache:PATH (a file written by job=ref_logps)")
  return path


def _image_bytes(image) -> bytes:
  if isinstance(image, records.InlineImage):
    return image.image_bytes
  try:
    with open(image, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"{image}: cannot read the image to hash it for the reference cache: {e}") from None


def record_key(pair) -> str:
  """SHA-256 of a tokenized pair's token ids and image bytes."""
  h = hashlib.sha256(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode())
  for image in pair.images:
    h.update(b"\0image\0")
    h.update(hashlib.sha256(_image_bytes(image)).digest())
  return h.hexdigest()


def checkpoint_id(model_cfg, seed: int) -> str:
  """What identifies the reference weights: the checkpoint files' SHA-256, or the preset + seed + dtype."""
  if not model_cfg.checkpoint:
    return f"preset {model_cfg.family}/{model_cfg.preset} seed={seed} param_dtype={model_cfg.param_dtype}"
  h = hashlib.sha256()
  root = os.path.abspath(model_cfg.checkpoint)
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      h.update(os.path.relpath(full, root).encode() + b"\0")
      with open(full, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          h.update(block)
  return f"sha256:{h.hexdigest()}"


def settings_of(config, loss_cfg) -> dict:
  """The run settings (besides weights and records) the reference log-probs depend on."""
  return {"compute_dtype": config.model.compute_dtype, "ld_alpha": float(loss_cfg.ld_alpha)}


def write(path: str, pairs, checkpoint: str, settings: dict) -> None:
  """Writes the cache atomically (pairs carry `ref_logps`)."""
  rows = [{"where": p.where, "key": record_key(p), "logps": [float(p.ref_logps[0]), float(p.ref_logps[1])]}
          for p in pairs]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT, "checkpoint": checkpoint, "settings": settings, "records": rows}, f)
  os.replace(tmp, path)


def attach(path: str, pairs, checkpoint: str, settings: dict, reference: str) -> list:
  """The pairs with their cached reference log-probs; a cache that does not match is refused."""
  if not os.path.isfile(path):
    raise ConfigError(f"config.dpo.reference={reference!r}: {path} does not exist; write it first with "
                      f"--config.job=ref_logps --config.dpo.reference={reference}")
  try:
    with open(path) as f:
      cache = json.load(f)
    rows, cached_ckpt, cached_settings = cache["records"], cache["checkpoint"], cache["settings"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a reference cache written by job=ref_logps ({e})") from None
  if cache.get("format") != FORMAT:
    raise DataError(f"{path}: reference cache format {cache.get('format')!r}, expected {FORMAT}; rewrite it")
  if cached_ckpt != checkpoint:
    raise ConfigError(f"{path}: stale reference cache: computed from the reference checkpoint {cached_ckpt!r}, but "
                      f"this run's reference is {checkpoint!r} (config.model.checkpoint / preset / seed); "
                      "rerun job=ref_logps")
  for key, value in settings.items():
    if cached_settings.get(key) != value:
      raise ConfigError(f"{path}: stale reference cache: computed with {key}={cached_settings.get(key)!r}, this run "
                        f"has {key}={value!r}; rerun job=ref_logps")
  by_key = {r["key"]: r["logps"] for r in rows}
  out = []
  for p in pairs:
    logps = by_key.get(record_key(p))
    if logps is None:
      raise DataError(f"{path}: stale reference cache: no cached reference log-probs for {p.where} (its tokens or "
                      "images differ from every cached record: edited, or tokenized with other data settings, "
                      "since the cache was written); rerun job=ref_logps")
    out.append(dataclasses.replace(p, ref_logps=(float(logps[0]), float(logps[1]))))
  return out
