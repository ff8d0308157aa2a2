"""Parameter trees on disk (orbax), written and read one group of tensors at a time.

A converted checkpoint's `params/` is either one orbax checkpoint of the whole tree (what the training
jobs' export writes) or a set of parts (what `hf-to-jax` writes): `params/parts.json` lists
`part-NNNNN/` directories, each an orbax checkpoint of a subset of the tree. Conversion writes a part
per group of tensors it has read, and readers restore only the tensors they ask for, so neither
direction of conversion holds more than a group on the host (issue 11 item 6).

Tensors are named by their flat path ("layers.0.attn.q.kernel", `io.flatten`'s names); `keys_of` maps
each name to its raw key tuple in the nested pure dict, so subsets keep the tree's own key types.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from jaxdpo.errors import ConversionError

PARTS_FILE = "parts.json"


def _raw(k):
  return getattr(k, "key", getattr(k, "idx", k))


def keys_of(tree) -> dict[str, tuple]:
  """Flat name ("a.b.0.c") -> the raw key tuple of every leaf of a nested dict."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    raw = tuple(_raw(k) for k in path)
    out[".".join(str(k) for k in raw)] = raw
  return out


def nested(flat: dict[str, Any], keys: dict[str, tuple]) -> dict:
  """The nested dict holding the leaves of `flat` (a subset of the tree `keys` describes)."""
  out: dict = {}
  for name, value in flat.items():
    node = out
    *head, last = keys[name]
    for k in head:
      node = node.setdefault(k, {})
    node[last] = value
  return out


@functools.cache
def _malloc_trim():
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc
    return None


def release_host_memory():
  """Hands freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

  glibc keeps freed blocks of a few MB (one converted tensor) in its heap, so without this the peak
  RSS of a streaming conversion creeps up by tens of MB per group even though nothing is held.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def natural_key(name: str) -> tuple:
  """Sort key that orders "layers.10" after "layers.9", so groups follow the model's layer order."""
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def save_tree(path: str, tree: dict):
  """Writes a nested dict of arrays as one orbax checkpoint (`path` must not exist)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree)
    ckptr.wait_until_finished()


def save_parts(path: str, parts: Iterable[dict[str, np.ndarray]], keys: dict[str, tuple]) -> int:
  """Writes each group of `parts` (flat name -> array) as its own orbax part, then `parts.json`.

  The groups are consumed one at a time, so a generator that reads its group only when asked keeps
  one group in memory. Returns the number of parts written.
  """
  os.makedirs(path)
  written = []
  for flat in parts:
    if not flat:
      continue
    name = f"part-{len(written):05d}"
    save_tree(os.path.join(path, name), nested(flat, keys))
    written.append({"name": name, "keys": sorted(flat)})
    del flat  # else this group stays alive while the generator reads the next one
    release_host_memory()
  with open(os.path.join(path, PARTS_FILE), "w") as f:
    json.dump({"parts": written}, f, indent=1)
  return len(written)


def _groups(path: str, wanted: list[str], keys: dict[str, tuple]) -> list[tuple[str, list[str], bool]]:
  """(orbax directory, wanted names stored there, whether that is all it holds) to restore from."""
  index = os.path.join(path, PARTS_FILE)
  if not os.path.exists(index):
    return [(path, wanted, set(wanted) == set(keys))]
  try:
    with open(index) as f:
      parts = json.load(f)["parts"]
  except (OSError, ValueError, KeyError) as e:
    raise ConversionError(f"{index}: cannot read the parts index ({type(e).__name__}: {e})") from e
  todo, out = set(wanted), []
  for part in parts:
    names = [k for k in part["keys"] if k in todo]
    if names:
      out.append((os.path.join(path, part["name"]), names, len(names) == len(part["keys"])))
      todo -= set(names)
  if todo:
    raise ConversionError(f"{index}: no part holds {sorted(todo)[:5]} ({len(todo)} tensors missing)")
  return out


def restore(path: str, targets: dict[str, jax.ShapeDtypeStruct], keys: dict[str, tuple]) -> dict[str, Any]:
  """Restores the named tensors: flat name -> array.

  Args:
    path: the `params/` directory (one orbax checkpoint, or parts).
    targets: flat name -> ShapeDtypeStruct (dtype to restore into; with a sharding the tensor is
      placed straight into it, without one it comes back as a numpy array).
    keys: `keys_of` the whole tree.
  """
  import orbax.checkpoint as ocp
  out: dict[str, Any] = {}
  for directory, names, whole in _groups(path, sorted(targets), keys):
    item = nested({k: targets[k] for k in names}, keys)
    if whole:
      with ocp.StandardCheckpointer() as ckptr:
        got = ckptr.restore(os.path.abspath(directory), item)
    else:
      def args(t):
        if getattr(t, "sharding", None) is not None:
          return ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)
      with ocp.PyTreeCheckpointer() as ckptr:
        got = ckptr.restore(os.path.abspath(directory), args=ocp.args.PyTreeRestore(
            item=item, restore_args=jax.tree.map(args, item), partial_restore=True))
    flat = {".".join(str(k) for k in raw): v
            for raw, v in ((tuple(_raw(k) for k in p), v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0])}
    out.update({k: flat[k] for k in names})
  return out
