"""Declarative HF <-> jaxdpo weight mapping, shared by every family.

A family describes its checkpoint as a list of `Rule`s: a regex over the *canonical* HF key
(after the family's key normaliser has folded legacy layouts into one) and a template for the
jaxdpo parameter path, plus the transform each way (transpose / reshape). Conversion reads
one safetensors shard at a time, checks every shape against the abstract model, and fails
with the full list of unconsumed, missing and mis-shaped keys before anything is written.
Reading streams; `hf-to-jax` and `jax-to-hf` still hold the whole converted tree in host
memory before writing it (issue 11 item 6, not yet built).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxdpo.errors import ConversionError  # noqa: F401  (raised here; kept importable from here)

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor family <-> one jaxdpo parameter family.

  Attributes:
    hf: regex (full match) over canonical HF keys; groups are substituted into `jax`.
    jax: dotted jaxdpo parameter path with `{0}`, `{1}` placeholders for the regex groups.
    to_jax: HF array -> jaxdpo array (e.g. transpose + reshape of a Linear weight).
    to_hf: the inverse.
  """

  hf: str
  jax: str
  to_jax: Transform = identity
  to_hf: Transform = identity

  def match(self, key: str):
    return re.fullmatch(self.hf, key)

  def hf_key(self, groups: tuple[str, ...]) -> str:
    """Rebuilds the canonical HF key from the groups of a jax path match."""
    out, gi = [], 0
    pattern = self.hf.replace("\\.", ".")
    for piece in re.split(r"(\([^)]*\))", pattern):
      if piece.startswith("("):
        out.append(groups[gi])
        gi += 1
      else:
        out.append(piece)
    return "".join(out)

  def jax_regex(self) -> str:
    # The jax template's placeholders become digit groups (layer indices).
    parts = re.split(r"(\{\d+\})", self.jax)
    return "".join(r"(\d+)" if re.fullmatch(r"\{\d+\}", p) else re.escape(p) for p in parts)


def linear_in(*out_shape: int) -> tuple[Transform, Transform]:
  """torch Linear weight [out, in] <-> jax kernel [in, *out_shape]."""
  def to_jax(w):
    return np.ascontiguousarray(w.T).reshape((w.shape[1],) + tuple(out_shape))
  def to_hf(k):
    return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)
  return to_jax, to_hf


def linear_out(*in_shape: int) -> tuple[Transform, Transform]:
  """torch Linear weight [out, in] <-> jax kernel [*in_shape, out] (e.g. o_proj -> [N, H, D])."""
  def to_jax(w):
    return np.ascontiguousarray(w.T).reshape(tuple(in_shape) + (w.shape[0],))
  def to_hf(k):
    return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)
  return to_jax, to_hf


def reshape(*shape: int) -> tuple[Transform, Transform]:
  """A pure reshape (biases of multi-head projections)."""
  def to_jax(b):
    return b.reshape(shape)
  def to_hf(b):
    return b.reshape(-1)
  return to_jax, to_hf


# ----------------------------------------------------------------------------------------------
# Key layouts

ROTARY_BUFFER = "rotary_emb.inv_freq"  # a non-persistent buffer some exports still write


def replace_prefix(key: str, prefixes: Sequence[tuple[str, str]]) -> str:
  """Rewrites the first matching (old prefix, new prefix) of `prefixes`; other keys pass unchanged."""
  for old, new in prefixes:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def key_normalizer(prefixes: Sequence[tuple[str, str]] = (), *, tied: bool,
                   buffer_suffixes: Sequence[str] = (ROTARY_BUFFER,)) -> Callable[[str], str | None]:
  """A family's HF key -> canonical key function.

  Args:
    prefixes: (layout prefix, canonical prefix) pairs, first match wins, so list canonical
      prefixes (mapped to themselves) before shorter legacy ones they start with.
    tied: whether the model ties its head to the embedding; a `lm_head.weight` copy that some
      exports still write is then ignored rather than reported as unconsumed.
    buffer_suffixes: keys ending so are buffers, not parameters, and are ignored.

  Returns:
    key -> canonical key, or None for keys to ignore.
  """
  def normalize(key: str) -> str | None:
    if any(key.endswith(suffix) for suffix in buffer_suffixes):
      return None
    key = replace_prefix(key, prefixes)
    if tied and key == "lm_head.weight":
      return None
    return key
  return normalize


# ----------------------------------------------------------------------------------------------
# Reading HF checkpoints


def list_shards(hf_dir: str) -> list[str]:
  """Safetensors files of an HF checkpoint directory, one file or sharded with an index."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes a safetensors file tensor by tensor, from the arrays' own buffers.

  `safetensors.numpy.save_file` first copies every tensor into a bytes object, which doubles the
  host memory of a shard; this writes the same format (8-byte little-endian header length, JSON
  header padded to 8 bytes, then the tensors' bytes back to back in header order) without a copy.
  """
  header, offset = {}, 0
  for key, arr in tensors.items():
    name = SAFETENSORS_DTYPES.get(arr.dtype.name)
    if name is None:
      raise ConversionError(f"{path}: tensor {key} has dtype {arr.dtype}, which safetensors cannot store")
    header[key] = {"dtype": name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for arr in tensors.values():
      arr = np.ascontiguousarray(arr)
      if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def iter_shard_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, numpy array) of one safetensors file, reading each tensor when it is asked for."""
  from safetensors import safe_open  # local import: only conversion needs it

  try:
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        yield key, f.get_tensor(key)
  except ConversionError:
    raise
  except Exception as e:  # safetensors raises several types for truncated/corrupt files
    raise ConversionError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def iter_hf_tensors(hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, numpy array) one shard at a time, so peak memory is about one shard."""
  for path in list_shards(hf_dir):
    yield from iter_shard_tensors(path)


class Converter:
  """Maps HF tensors onto jaxdpo parameter paths one at a time; `finish` reports every problem.

  Args:
    rules: the family's table.
    expected: jax path -> shape of every parameter of the target model.
    normalize_key: maps an HF key to its canonical form, or None to ignore it explicitly
      (e.g. rotary caches or a tied lm_head duplicate).
    dtype: optional numpy dtype to cast to; default keeps the checkpoint dtype.
  """

  def __init__(self, rules: list[Rule], expected: dict[str, tuple], normalize_key: Callable[[str], str | None], *,
               dtype=None):
    self.rules, self.expected, self.normalize_key, self.dtype = rules, expected, normalize_key, dtype
    self.done: set[str] = set()
    self.unconsumed: list[str] = []
    self.misshaped: list[str] = []

  def convert(self, key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    """(jax path, array) for one HF tensor, or None (ignored, or a problem kept for `finish`)."""
    canon = self.normalize_key(key)
    if canon is None:
      return None
    for rule in self.rules:
      m = rule.match(canon)
      if m is None:
        continue
      path = rule.jax.format(*m.groups())
      expected = self.expected.get(path)
      if expected is None:
        self.unconsumed.append(f"{key} (-> {path}, which the model does not have)")
        return None
      try:
        arr = rule.to_jax(value)
      except ValueError as e:
        self.misshaped.append(f"{key}: {value.shape} cannot map to {path} {expected} ({e})")
        return None
      if tuple(arr.shape) != tuple(expected):
        self.misshaped.append(f"{key}: shape {tuple(value.shape)} -> {tuple(arr.shape)}, model expects "
                              f"{tuple(expected)} at {path}")
        return None
      if self.dtype is not None:
        arr = arr.astype(self.dtype)
      self.done.add(path)
      return path, arr
    self.unconsumed.append(key)
    return None

  def finish(self):
    """Raises ConversionError listing every unconsumed, missing and mis-shaped key."""
    missing = sorted(set(self.expected) - self.done)
    if self.unconsumed or missing or self.misshaped:
      lines = []
      for title, items in (("unconsumed HF keys", self.unconsumed), ("missing model parameters", missing),
                           ("shape mismatches", self.misshaped)):
        if items:
          lines.append(f"{title} ({len(items)}):")
          lines.extend(f"  {x}" for x in items[:50])
          if len(items) > 50:
            lines.append(f"  ... and {len(items) - 50} more")
      raise ConversionError("checkpoint does not match the model:\n" + "\n".join(lines))


def hf_to_jax(tensors: Iterator[tuple[str, np.ndarray]], rules: list[Rule], expected: dict[str, tuple],
              normalize_key: Callable[[str], str | None], *, dtype=None,
              place: Callable[[str, np.ndarray], object] | None = None) -> dict[str, object]:
  """Maps a stream of HF tensors onto jaxdpo parameter paths (see `Converter`).

  Args:
    tensors: (hf_key, array) stream.
    rules, expected, normalize_key, dtype: as for `Converter`.
    place: optional callback (path, array) -> device array, e.g. `jax.device_put` into a
      target sharding, called as each tensor arrives.

  Returns:
    flat dict jax path -> array.

  Raises:
    ConversionError: listing every unconsumed, missing and mis-shaped key.
  """
  conv = Converter(rules, expected, normalize_key, dtype=dtype)
  out: dict[str, object] = {}
  for key, value in tensors:
    got = conv.convert(key, value)
    if got is not None:
      out[got[0]] = place(*got) if place is not None else got[1]
  conv.finish()
  return out


def hf_key_of(path: str, rules: list[Rule], denormalize_key: Callable[[str], str] = lambda k: k) -> str:
  """The HF key a jax parameter path is written under (no tensor needed)."""
  for rule in rules:
    m = re.fullmatch(rule.jax_regex(), path)
    if m is not None:
      return denormalize_key(rule.hf_key(m.groups()))
  raise ConversionError(f"no rule maps jax parameter {path} back to an HF key")


def jax_to_hf(flat_params: dict[str, np.ndarray], rules: list[Rule],
              denormalize_key: Callable[[str], str] = lambda k: k) -> dict[str, np.ndarray]:
  """Inverse of `hf_to_jax`: jax path -> HF key (in the layout `denormalize_key` chooses)."""
  out = {}
  for path, value in flat_params.items():
    for rule in rules:
      m = re.fullmatch(rule.jax_regex(), path)
      if m is None:
        continue
      out[denormalize_key(rule.hf_key(m.groups()))] = np.ascontiguousarray(rule.to_hf(np.asarray(value)))
      break
    else:
      raise ConversionError(f"no rule maps jax parameter {path} back to an HF key")
  return out
