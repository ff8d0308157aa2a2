"""Issue 14 acceptance 5: eval and mine write their rows in chunks; a killed job re-run in the same
workdir resumes from them (no duplicate, no gap) and writes the same final files.

Levels: the chunk driver with a fake generator (cheap, with a negative control: a sampler that
draws from one process-wide stream does not survive a resume); eval in-process, "killed" by the
test hook after a chunk; mine through `python -m jaxdpo.main`, killed for real (SIGKILL).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxdpo.errors import ConfigError
from jaxdpo.jobs import defaults
from jaxdpo.jobs import evaluate as eval_job
from jaxdpo.jobs import outputs
from tests._dpo_helpers import ROOT

TIMING = ("batch_wall_time_s", "wall_time_s")  # the only fields of a row that differ between two identical runs
# (static batches time a batch, row refill each row)


class Killed(Exception):
  """Stands for the SIGKILL of `generate.debug_kill_after_chunk` in in-process tests."""


def _items(n: int, text: str = "p"):
  return [(types.SimpleNamespace(fields={"prompt": f"{text}{i}"}), types.SimpleNamespace(images=()))
          for i in range(n)]


def _base(**overrides):
  c = defaults.base()
  c.generate.batch_size = 2
  c.generate.chunk_batches = 2  # 4 records per chunk
  for key, value in overrides.items():
    group, leaf = key.split(".")
    setattr(getattr(c, group), leaf, value)
  return c


def _sampler(calls: list, kill_at: int = -1, stream=None):
  """A fake `generate_chunk`: one row per record, a "sample" drawn from the chunk seed (or `stream`)."""
  def generate_chunk(chunk_items, seed):
    calls.append(chunk_items[0][0].fields["prompt"])
    if len(calls) - 1 == kill_at:
      raise Killed()
    rng = stream if stream is not None else np.random.default_rng(seed)
    return [{"index": i, "batch_id": i // 2, "sample": 0, "tokens": rng.integers(0, 1000, 3).tolist()}
            for i in range(len(chunk_items))]
  return generate_chunk


def test_driver_resumes_with_the_same_samples(tmp_path):
  items = _items(10)  # 3 chunks: 4, 4, 2 records
  whole, _ = outputs.generate_resumable(_base(), str(tmp_path / "a"), "mine", items, _sampler([]))
  assert [r["index"] for r in whole] == list(range(10))
  assert [r["batch_id"] for r in whole] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # unique over the run
  per_row = _sampler([])  # rows timed on their own (row refill: `wall_time_s`, no batch_id) pass through
  untimed = lambda chunk_items, seed: [{k: v for k, v in r.items() if k != "batch_id"}
                                       for r in per_row(chunk_items, seed)]
  rows, _ = outputs.generate_resumable(_base(), str(tmp_path / "c"), "mine", items, untimed)
  assert [r["index"] for r in rows] == list(range(10)) and not any("batch_id" in r for r in rows)

  calls: list = []
  with pytest.raises(Killed):
    outputs.generate_resumable(_base(), str(tmp_path / "b"), "mine", items, _sampler(calls, kill_at=2))
  assert sorted(os.listdir(tmp_path / "b" / "chunks" / "mine")) == ["00000.jsonl", "00001.jsonl", "manifest.json"]
  calls.clear()
  resumed, store = outputs.generate_resumable(_base(), str(tmp_path / "b"), "mine", items, _sampler(calls))
  assert calls == ["p8"]  # only the missing chunk was generated
  assert resumed == whole
  store.remove()
  assert not (tmp_path / "b" / "chunks").exists()


def test_negative_control_a_process_wide_stream_does_not_survive_a_resume(tmp_path):
  items = _items(10)
  whole, _ = outputs.generate_resumable(_base(), str(tmp_path / "a"), "mine", items,
                                        _sampler([], stream=np.random.default_rng(0)))
  with pytest.raises(Killed):
    outputs.generate_resumable(_base(), str(tmp_path / "b"), "mine", items,
                               _sampler([], kill_at=1, stream=np.random.default_rng(0)))
  resumed, _ = outputs.generate_resumable(_base(), str(tmp_path / "b"), "mine", items,
                                          _sampler([], stream=np.random.default_rng(0)))
  assert [r["index"] for r in resumed] == list(range(10))
  assert resumed != whole  # the comparison above would catch a sampler that depends on what came before


def test_partial_output_of_another_config_is_refused_naming_the_key(tmp_path):
  items = _items(10)
  with pytest.raises(Killed):
    outputs.generate_resumable(_base(), str(tmp_path), "eval", items, _sampler([], kill_at=1))
  with pytest.raises(ConfigError, match=r"changed: generate\.max_new_tokens: 64 -> 12\b.*remove .*chunks/eval"):
    outputs.generate_resumable(_base(**{"generate.max_new_tokens": 12}), str(tmp_path), "eval", items, _sampler([]))
  with pytest.raises(ConfigError, match=r"records \(data\.prompts content\)"):
    outputs.generate_resumable(_base(), str(tmp_path), "eval", _items(10, text="q"), _sampler([]))
  with pytest.raises(ConfigError, match=r"number of records: 10 -> 11"):
    outputs.generate_resumable(_base(), str(tmp_path), "eval", _items(11), _sampler([]))
  extra = ("mine.temperature",)  # a job's extra keys count too
  with pytest.raises(Killed):
    outputs.generate_resumable(_base(), str(tmp_path / "m"), "mine", items, _sampler([], kill_at=1), extra_keys=extra)
  with pytest.raises(ConfigError, match=r"mine\.temperature: 1\.0 -> 0\.5"):
    outputs.generate_resumable(_base(**{"mine.temperature": 0.5}), str(tmp_path / "m"), "mine", items, _sampler([]),
                               extra_keys=extra)
  # Run control and the mesh may change: the run resumes.
  calls: list = []
  rows, _ = outputs.generate_resumable(_base(**{"mesh.data": 2, "train.progress": False}), str(tmp_path), "eval",
                                       items, _sampler(calls))
  assert calls == ["p4", "p8"] and [r["index"] for r in rows] == list(range(10))


def test_chunk_seeds_depend_on_the_chunk_only():
  assert outputs.chunk_seed(0, 3) == outputs.chunk_seed(0, 3)
  assert len({outputs.chunk_seed(s, c) for s in range(4) for c in range(50)}) == 200


# ---- eval, in-process: killed by the hook after chunk 1 of 3, then re-run ---------------------------------

def _job_config(name: str, **overrides):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.progress = False
  for key, value in overrides.items():
    group, leaf = key.split(".")
    setattr(getattr(c, group), leaf, value)
  return c


def _rows(path):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(path)]


def _summary(path):
  return {k: v for k, v in json.load(open(path)).items() if "time" not in k}


def test_eval_killed_midway_resumes_to_the_same_output(tmp_path, monkeypatch):
  eval_cfg = {"generate.max_new_tokens": 12, "degeneration.tail_window": 12, "generate.chunk_batches": 1,
              "mesh.data": 1}
  eval_job.run(_job_config("tiny_eval", **eval_cfg), str(tmp_path / "whole"))

  def die():
    raise Killed()
  monkeypatch.setattr(outputs, "_die", die)
  split = str(tmp_path / "split")
  with pytest.raises(Killed):
    eval_job.run(_job_config("tiny_eval", **eval_cfg, **{"generate.debug_kill_after_chunk": 1}), split)
  assert sorted(os.listdir(os.path.join(split, "chunks", "eval"))) == ["00000.jsonl", "00001.jsonl", "manifest.json"]
  assert not os.path.exists(os.path.join(split, "generations.jsonl"))
  with pytest.raises(ConfigError, match=r"generate\.max_new_tokens: 12 -> 10"):
    eval_job.run(_job_config("tiny_eval", **{**eval_cfg, "generate.max_new_tokens": 10}), split)
  eval_job.run(_job_config("tiny_eval", **eval_cfg), split)
  whole = _rows(tmp_path / "whole" / "generations.jsonl")
  assert _rows(os.path.join(split, "generations.jsonl")) == whole
  assert [r["index"] for r in whole] == list(range(24))
  assert _summary(os.path.join(split, "eval_summary.json")) == _summary(tmp_path / "whole" / "eval_summary.json")
  assert not os.path.exists(os.path.join(split, "chunks"))


# ---- mine, through jaxdpo.main: SIGKILLed after chunk 2 of 6, then re-run (acceptance 5) -------------------

MINE = ["--config.train.progress=False", "--config.generate.max_new_tokens=12", "--config.degeneration.tail_window=12",
        "--config.generate.chunk_batches=1", "--config.mesh.data=1"]  # 4 records (8 samples) per chunk


def _mine(workdir, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  cmd = [sys.executable, "-m", "jaxdpo.main", "--config", "configs/tiny_mine.py", "--workdir", str(workdir), *MINE,
         *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc):
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def test_mine_killed_midway_resumes_to_byte_identical_pairs(tmp_path):
  whole, killed = _mine(tmp_path / "whole"), _mine(tmp_path / "split", "--config.generate.debug_kill_after_chunk=2")
  rc, _, err = _wait(killed)
  assert rc == -signal.SIGKILL, err[-3000:]
  chunks = tmp_path / "split" / "chunks" / "mine"
  assert sorted(os.listdir(chunks)) == ["00000.jsonl", "00001.jsonl", "00002.jsonl", "manifest.json"]
  assert not (tmp_path / "split" / "pairs.jsonl").exists()
  rc, _, err = _wait(whole)
  assert rc == 0, err[-3000:]
  rc, _, err = _wait(_mine(tmp_path / "split"))
  assert rc == 0, err[-3000:]
  assert "mine: resuming from" in err and "3 of 6 chunks (12 of 24 records) already done" in err
  pairs = (tmp_path / "whole" / "pairs.jsonl").read_bytes()
  assert pairs.strip() and (tmp_path / "split" / "pairs.jsonl").read_bytes() == pairs
  samples = _rows(tmp_path / "whole" / "samples.jsonl")
  assert _rows(tmp_path / "split" / "samples.jsonl") == samples
  assert [(r["index"], r["sample"]) for r in samples] == [(i, s) for i in range(24) for s in range(2)]
  assert len({tuple(r["tokens"]) for r in samples}) > len(samples) // 2  # sampled, not one output repeated
  summary = json.load(open(tmp_path / "whole" / "mine_summary.json"))
  assert json.load(open(tmp_path / "split" / "mine_summary.json")) == summary
