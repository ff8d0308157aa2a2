"""Loading and validating records.

Records come from local JSONL / JSON / Parquet files (loaded with `datasets`) or from a hub
dataset name. Every record is validated before anything is trained on it; an error names the
file, the line (1-based, for JSONL) or row, and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from jaxdpo.errors import DataError  # noqa: F401  (raised here; kept importable from here)

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
# Optional: True when the rejected sample hit the generation limit without emitting EOS (mine
# writes it); tokenization then appends no EOS to it, so DPO does not push down stopping.
REJECTED_HIT_LIMIT = "rejected_hit_limit"


@dataclasses.dataclass(frozen=True)
class Record:
  """A validated record and where it came from ("file.jsonl:12")."""

  where: str
  fields: dict[str, Any]


def _scan_jsonl(path: str, skips=None) -> tuple[list[int], list[dict] | None]:
  """Checks every line is a JSON object; returns the line numbers of the records.

  `datasets`' JSON reader reports malformed input without a line number, so this cheap pass
  runs first and names the line. With `skips` (a `skipping.SkipLog` that skips), bad lines are
  recorded there instead, and the good rows are returned as parsed here (datasets' reader
  would stop at the bad lines); otherwise the rows are None.
  """
  lines, rows, bad = [], [], 0
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
          raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
      except json.JSONDecodeError as e:
        err = DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})")
        if skips is None:
          raise err from None
        skips.add(f"{path}:{n}", err)
        bad += 1
        continue
      except DataError as e:
        if skips is None:
          raise
        skips.add(f"{path}:{n}", e)
        bad += 1
        continue
      lines.append(n)
      rows.append(obj)
  return lines, (rows if bad else None)


def load_rows(source: str, split: str = "train", skips=None) -> list[tuple[str, dict]]:
  """Loads raw rows with `datasets`; returns (location, row) pairs.

  Args:
    source: a local .jsonl/.json/.parquet file, or a hub dataset name ("org/name").
    split: the split to read from a hub dataset.
    skips: a `jaxdpo.data.skipping.SkipLog` that skips: malformed JSONL lines are recorded
      there instead of stopping the load.
  """
  import datasets  # heavy import, only when loading

  datasets.disable_progress_bars()
  if os.path.isfile(source):
    ext = os.path.splitext(source)[1].lower()
    if ext in (".jsonl", ".json"):
      line_numbers, parsed = _scan_jsonl(source, skips if skips is not None and skips.enabled else None) \
          if ext == ".jsonl" else (None, None)
      if line_numbers == []:
        raise DataError(f"{source}: no records")
      if parsed is not None:  # some lines were skipped: datasets' reader would stop at them
        return [(f"{source}:{n}", row) for n, row in zip(line_numbers, parsed)]
      ds = datasets.load_dataset("json", data_files=source, split="train")
    elif ext == ".parquet":
      ds = datasets.load_dataset("parquet", data_files=source, split="train")
      line_numbers = None
    else:
      raise DataError(f"{source}: unsupported file type {ext!r}; use .jsonl, .json or .parquet")
    rows = ds.to_list()
    where = [f"{source}:{n}" for n in line_numbers] if line_numbers else [f"{source}:row {i}" for i in
                                                                          range(len(rows))]
    return list(zip(where, rows))
  if os.path.isdir(source):
    return _load_saved(source, split)
  if os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
    raise DataError(f"{source}: no such data file (and not a hub dataset name like 'org/name')")
  ds = datasets.load_dataset(source, split=split)  # real hub loading; tests use local files only
  return [(f"{source}[{split}]:row {i}", row) for i, row in enumerate(ds)]


def _load_saved(source: str, split: str) -> list[tuple[str, dict]]:
  """Rows of a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict's `split`).

  `Image` columns are read undecoded ({"bytes", "path"}), so a large dataset stays compressed
  in memory; each image is decoded when its batch is built.
  """
  import datasets
  try:
    ds = datasets.load_from_disk(source)
  except FileNotFoundError as e:
    raise DataError(f"{source}: a directory, but not one written by datasets' save_to_disk ({e})") from None
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise DataError(f"{source}: no split {split!r} (config.data.split); splits: {sorted(ds)}")
    ds = ds[split]
  ds = ds.cast(_undecoded(ds.features))
  return [(f"{source}:row {i}", row) for i, row in enumerate(ds)]


def _undecoded(features):
  """`features` with every `datasets.Image` set to decode=False (nested lists included)."""
  import datasets

  def fix(f):
    if isinstance(f, datasets.Image):
      return datasets.Image(decode=False)
    if isinstance(f, dict):
      return {k: fix(v) for k, v in f.items()}
    if isinstance(f, list):
      return [fix(v) for v in f]
    for cls in ("Sequence", "List", "LargeList"):
      kind = getattr(datasets, cls, None)
      if kind is not None and isinstance(f, kind):
        return dataclasses.replace(f, feature=fix(f.feature))
    return f
  return datasets.Features({k: fix(v) for k, v in features.items()})


def _check_text_or_messages(value, where: str, field: str, *, completion: bool):
  if isinstance(value, str):
    if completion and not value.strip():
      raise DataError(f"{where}: field '{field}' is an empty completion")
    return
  if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
    for i, m in enumerate(value):
      if "role" not in m or "content" not in m:
        raise DataError(f"{where}: field '{field}' message {i} needs 'role' and 'content'")
    if completion and not any(_content_text(m["content"]).strip() for m in value):
      raise DataError(f"{where}: field '{field}' is an empty completion")
    return
  if isinstance(value, list) and not value:
    raise DataError(f"{where}: field '{field}' is an empty " + ("completion" if completion else "message list"))
  raise DataError(f"{where}: field '{field}' must be a string or a list of chat messages, got "
                  f"{type(value).__name__}")


def _content_text(content) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # multimodal content parts
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
  return ""


def validate_preference(where: str, row: dict) -> Record:
  """Validates a `{"prompt", "chosen", "rejected", "images"?}` row."""
  for field in PREFERENCE_FIELDS:
    if field not in row or row[field] is None:
      raise DataError(f"{where}: record has no '{field}' field")
  _check_text_or_messages(row["prompt"], where, "prompt", completion=False)
  _check_text_or_messages(row["chosen"], where, "chosen", completion=True)
  _check_text_or_messages(row["rejected"], where, "rejected", completion=True)
  _check_images(row, where)
  if row.get(REJECTED_HIT_LIMIT) is not None and not isinstance(row[REJECTED_HIT_LIMIT], bool):
    raise DataError(f"{where}: field '{REJECTED_HIT_LIMIT}' must be true or false, got {row[REJECTED_HIT_LIMIT]!r}")
  keep = (*PREFERENCE_FIELDS, "images", REJECTED_HIT_LIMIT)
  return Record(where, {k: row[k] for k in keep if k in row and row[k] is not None})


def validate_completion(where: str, row: dict, *, completion_field: str = "completion",
                        require_completion: bool = True) -> Record:
  """Validates a `{"prompt", "completion"|"reference", "images"?}` row (SFT and eval)."""
  if "prompt" not in row or row["prompt"] is None:
    raise DataError(f"{where}: record has no 'prompt' field")
  _check_text_or_messages(row["prompt"], where, "prompt", completion=False)
  if require_completion:
    if completion_field not in row or row[completion_field] is None:
      raise DataError(f"{where}: record has no '{completion_field}' field")
  if row.get(completion_field) is not None:
    _check_text_or_messages(row[completion_field], where, completion_field, completion=True)
  _check_images(row, where)
  keep = ("prompt", completion_field, "images")
  return Record(where, {k: row[k] for k in keep if k in row and row[k] is not None})


@dataclasses.dataclass(frozen=True)
class InlineImage:
  """An image stored in the record itself (encoded bytes: PNG, JPEG, ...), named for errors."""

  image_bytes: bytes
  name: str


def _image_entry(value, where: str, i: int):
  """One `images` entry -> a path (str) or an `InlineImage`.

  Accepted: a path; `{"bytes": ..., "path": ...}` as `datasets.Image` stores it (bytes, or base64
  text in JSON; a path alone when the bytes are absent); a PIL image (a decoded `Image` column).
  """
  name = f"{where}: images[{i}]"
  if isinstance(value, str):
    return value
  if isinstance(value, dict):
    data, path = value.get("bytes"), value.get("path")
    if data is None:
      if isinstance(path, str) and path:
        return path
      raise DataError(f"{name}: an image entry needs 'bytes' or 'path'")
    if isinstance(data, str):
      import base64
      import binascii
      try:
        data = base64.b64decode(data, validate=True)
      except binascii.Error as e:
        raise DataError(f"{name}: 'bytes' is text but not base64 ({e})") from None
    if not isinstance(data, (bytes, bytearray)):
      raise DataError(f"{name}: 'bytes' must be bytes or base64 text, got {type(data).__name__}")
    return InlineImage(bytes(data), f"{name}" + (f" ({path})" if path else ""))
  try:
    from PIL import Image
  except ImportError:  # pragma: no cover  (PIL comes with the vision extras)
    Image = None
  if Image is not None and isinstance(value, Image.Image):
    import io
    buf = io.BytesIO()
    value.save(buf, format=value.format or "PNG")
    return InlineImage(buf.getvalue(), name)
  raise DataError(f"{name}: expected an image path, a {{'bytes', 'path'}} entry or an image, got "
                  f"{type(value).__name__}")


def _check_images(row: dict, where: str):
  """Validates `row["images"]` and normalises it to paths and `InlineImage`s (in place)."""
  images = row.get("images")
  if images is None:
    return
  if not isinstance(images, list):
    raise DataError(f"{where}: field 'images' must be a list of image paths or image entries")
  row["images"] = [_image_entry(v, where, i) for i, v in enumerate(images)]


def load_preferences(source: str, split: str = "train", skips=None) -> list[Record]:
  """Loads and validates a preference dataset (bad rows recorded in `skips` when it skips)."""
  if skips is None or not skips.enabled:
    return [validate_preference(w, r) for w, r in load_rows(source, split)]
  out = [skips.attempt(w, lambda w=w, r=r: validate_preference(w, r)) for w, r in load_rows(source, split, skips)]
  return [r for r in out if r is not None]


def resolve_image_paths(record: Record, paths: Sequence, base_dir: str) -> list:
  """Image paths relative to the data file's directory; missing files name the record.

  `InlineImage`s pass through unchanged.
  """
  out = []
  for p in paths:
    if isinstance(p, InlineImage):
      out.append(p)
      continue
    full = p if os.path.isabs(p) else os.path.join(base_dir, p)
    if not os.path.exists(full):
      raise DataError(f"{record.where}: field 'images': file not found: {full}")
    out.append(full)
  return out
