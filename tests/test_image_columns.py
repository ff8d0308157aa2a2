"""Images as users store them (issue 12, acceptance 6): a `datasets.Dataset` with an `Image`
column, saved with `save_to_disk`, trains through `python -m jaxdpo.main` (data.train = the
directory), here with `model.trainable=language`; image bytes in JSONL (base64) and Parquet load as the same images as their paths."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _vision_job_helpers as VH
from jaxdpo.data import records
from jaxdpo.data.vision import images as images_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(tmp_path):
  """Preference rows with 1 or 2 images each (paths) from the shared helpers."""
  _, _, prefs = VH.vision_records(str(tmp_path / "data"), n=4, seed=0)
  with open(prefs) as f:
    rows = [json.loads(line) for line in f]
  rows = [r for r in rows if r.get("images")]
  for r in rows:
    r["images"] = [os.path.join(tmp_path, "data", p) for p in r["images"]]
  return rows


def jax_flat(state):
  import jax
  from flax import nnx
  return jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]


def _pixels(image):
  return np.asarray(images_lib.load_image(image)[0].convert("RGB"))


def test_a_saved_image_dataset_trains_through_main(tmp_path):
  import datasets
  from PIL import Image
  rows = _rows(tmp_path)
  features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                                "rejected": datasets.Value("string"),
                                "images": datasets.Sequence(datasets.Image())})
  ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected", "images")},
                                  features=features)
  saved = str(tmp_path / "saved")
  ds.save_to_disk(saved)
  os.rename(tmp_path / "data", tmp_path / "gone")  # the saved dataset holds the image bytes itself
  loaded = records.load_preferences(saved)
  assert [len(r.fields["images"]) for r in loaded] == [len(r["images"]) for r in rows]
  assert all(isinstance(im, records.InlineImage) for r in loaded for im in r.fields["images"])
  first = loaded[0].fields["images"][0]
  expected = np.asarray(Image.open(rows[0]["images"][0].replace(str(tmp_path / "data"), str(tmp_path / "gone")))
                        .convert("RGB"))
  assert np.array_equal(_pixels(first), expected)

  ck, _ = VH.build_checkpoint("qwen2_5_vl", str(tmp_path), seed=1)
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", os.path.join(ROOT, "configs", "tiny_vl.py:dpo"),
         "--workdir", str(workdir), "--config.train.progress=False", "--config.mesh.data=1",
         f"--config.model.checkpoint={ck}", f"--config.data.tokenizer={ck}/tokenizer",
         f"--config.data.train={saved}", "--config.data.eval=", "--config.data.degeneration_eval=",
         "--config.train.num_steps=2", "--config.train.batch_size=2", "--config.train.log_every=1",
         "--config.model.trainable=language", "--config.optim.lr=1e-2", "--config.optim.warmup_steps=0"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  with open(workdir / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
  # Through the job, model.trainable=language (acceptance 1): the exported model's vision tower and
  # projector are bit-identical to the checkpoint it started from; the language model moved.
  from jaxdpo.models import io, trainable
  before, after = ({trainable.path_str(p): np.asarray(x) for p, x in
                    jax_flat(io.load_model(d)[3])} for d in (ck, str(workdir / "model")))
  vision = [k for k in before if k.startswith("visual/")]
  assert vision and all(np.array_equal(before[k], after[k]) for k in vision)
  assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("language_model/"))


def test_image_bytes_in_jsonl_and_parquet(tmp_path):
  import pandas as pd
  rows = _rows(tmp_path)
  raw = [[open(p, "rb").read() for p in r["images"]] for r in rows]
  as_b64 = [dict(r, images=[{"bytes": base64.b64encode(b).decode(), "path": None} for b in bs])
            for r, bs in zip(rows, raw)]
  jsonl = VH.write_jsonl(str(tmp_path / "b64.jsonl"), as_b64)
  parquet = str(tmp_path / "bytes.parquet")
  pd.DataFrame([dict(r, images=[{"bytes": b, "path": "x.png"} for b in bs]) for r, bs in zip(rows, raw)]
               ).to_parquet(parquet)
  for source in (jsonl, parquet):
    loaded = records.load_preferences(source)
    for rec, row in zip(loaded, rows):
      assert len(rec.fields["images"]) == len(row["images"])
      for got, path in zip(rec.fields["images"], row["images"]):
        assert isinstance(got, records.InlineImage)
        assert np.array_equal(_pixels(got), _pixels(path))


def test_bad_image_entries_name_the_record(tmp_path):
  rows = _rows(tmp_path)[:1]
  bad = VH.write_jsonl(str(tmp_path / "bad.jsonl"), [dict(rows[0], images=[{"bytes": "not base64!"}])])
  with pytest.raises(records.DataError, match=r"bad.jsonl:1: images\[0\]: 'bytes' is text but not base64"):
    records.load_preferences(bad)
  junk = VH.write_jsonl(str(tmp_path / "junk.jsonl"),
                        [dict(rows[0], images=[{"bytes": base64.b64encode(b"junk").decode()}])])
  image = records.load_preferences(junk)[0].fields["images"][0]
  with pytest.raises(images_lib.ImageError, match=r"junk.jsonl:1: images\[0\]: cannot decode image bytes"):
    images_lib.load_image(image)
