"""The command line as a new user meets it: --help, config paths, early validation."""

import json
import os
import subprocess
import sys

import pytest

from jaxdpo.cli import help_text
from jaxdpo.cli import main as jmain
from jaxdpo.errors import ConfigError
from tests._dpo_helpers import ROOT, demo_config

GOOD = {"prompt": "transcribe : alpha bravo", "chosen": "alpha bravo", "rejected": "alpha alpha alpha"}


def _cli(*args, cwd=ROOT, timeout=300):
  # This checkout first on the path, as an installed jaxdpo would be, whatever the working directory.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "jaxdpo.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_help_lists_jobs_configs_and_every_key_with_its_default():
  out = _cli("--help")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "usage: python -m jaxdpo.main" in text
  assert "dpo.beta" in text and any(line.split()[:3] == ["dpo.beta", "=", "0.1"] for line in text.splitlines())
  assert "tiny_dpo.py" in text and "tiny_vl.py" in text
  for job in ("dpo", "sft", "eval", "mine"):
    assert f"  {job} " in text
  # Generated from the defaults: every key is listed, so the help cannot drift from them.
  for key, _, _ in help_text.config_keys():
    assert f"  {key} " in text, key


def test_help_jobs_are_the_job_table():
  assert sorted(help_text.JOBS) == sorted(jmain._job_table())


def test_key_comments_follow_the_assignment_lines():
  src = 'c.a.b = 1   # first\n  c.a.c = 2\n  c.a.d = "x"  # one\n                # two\n'
  assert help_text.key_comments(src) == {"a.b": "first", "a.d": "one two"}


def test_missing_config_file_is_one_line_exit_2(tmp_path):
  out = _cli("--config", "configs/nonexistent.py", "--workdir", str(tmp_path / "w"))
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("error: --config configs/nonexistent.py: no such config file") and "tiny_dpo.py" in lines[0]
  assert not (tmp_path / "w").exists()


def test_shipped_config_runs_from_another_directory(tmp_path):
  """`configs/tiny_dpo.py` from a directory without configs/ resolves to the packaged config."""
  work = tmp_path / "run"
  out = _cli("--config", "configs/tiny_dpo.py", "--workdir", str(work), "--config.train.num_steps=2",
             "--config.train.log_every=1", "--config.train.progress=False", "--config.mesh.data=1", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  config = json.loads((work / "config.json").read_text())
  assert config["train"]["num_steps"] == 2 and config["job"] == "dpo"
  assert (work / "model").is_dir()
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert "eval/loss" in rows[-1]  # the shipped held-out file is scored at the end
  # The end-of-run summary, on stdout and in summary.json.
  summary = json.loads((work / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["stopped"] == "finished" and summary["model"] == str(work / "model")
  assert summary["final"]["loss"] == rows[-1]["loss"] and summary["eval"]["eval/loss"] == rows[-1]["eval/loss"]
  # A preset-initialised model carries a derived HF config, so the summary gives the export command.
  assert summary["export_command"].startswith(f"python -m jaxdpo.convert jax-to-hf --ckpt {work / 'model'}")
  assert out.stdout.splitlines()[0] == "dpo finished at step 2/2"
  assert "  export   python -m jaxdpo.convert jax-to-hf" in out.stdout
  assert "  held-out loss" in out.stdout
  assert out.stderr.count("memory plan per device") == 1  # the plan table once
  assert f"finished at step 2: checkpoint saved to {work / 'checkpoints' / '2'}" in out.stderr


def test_config_resolution_by_name_and_with_an_argument(tmp_path):
  from jaxdpo.cli import config_paths
  shipped = os.path.join(config_paths.SHIPPED_DIR, "tiny_vl.py")
  os.chdir(tmp_path)
  assert config_paths.resolve("tiny_vl.py:sft") == shipped + ":sft"
  assert config_paths.resolve("configs/tiny_vl.py") == shipped
  own = tmp_path / "configs" / "tiny_vl.py"  # a user's own file of the same name wins
  own.parent.mkdir()
  own.write_text("")
  assert config_paths.resolve("configs/tiny_vl.py:dpo") == str(own) + ":dpo"
  with pytest.raises(ConfigError, match="no such config file"):
    config_paths.resolve("elsewhere/tiny_dpo.py")


def _never_build(monkeypatch):
  events = []
  from jaxdpo.jobs import model_setup

  def refuse(*args, **kwargs):
    events.append("model built")
    raise AssertionError("the model was built before the config was validated")
  monkeypatch.setattr(model_setup, "setup_model", refuse)
  return events


def test_loss_type_typo_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
  events = _never_build(monkeypatch)
  config = demo_config(**{"dpo.loss_type": "sigmod"})
  with pytest.raises(ConfigError, match=r"config.dpo.loss_type='sigmod': expected one of 'sigmoid'"):
    jmain.run(config, str(tmp_path / "w"))
  assert events == [] and not (tmp_path / "w").exists()


def test_loss_type_typo_through_the_cli_is_one_line(tmp_path):
  out = _cli("--config", "configs/tiny_dpo.py", "--workdir", str(tmp_path / "w"), "--config.dpo.loss_type=sigmod")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: config.dpo.loss_type='sigmod'")
  assert "memory plan" not in out.stderr and "tokenize" not in out.stderr  # nothing ran before the check


@pytest.mark.parametrize("key,value,match", [
    ("optim.schedule", "cosine", "config.optim.schedule='cosine'"),
    ("train.grad_accum", 3, "not divisible by config.train.grad_accum=3"),
    ("train.num_steps", 0, "config.train.num_steps=0"),
    ("data.truncation", "left", "config.data.truncation='left'"),
    ("model.preset", "huge", "config.model.preset='huge'"),
    ("mine.rejected", "worst", "config.mine.rejected='worst'"),
])
def test_other_bad_values_are_refused_early(tmp_path, monkeypatch, key, value, match):
  events = _never_build(monkeypatch)
  with pytest.raises(ConfigError, match=match):
    jmain.run(demo_config(**{key: value}), str(tmp_path / "w"))
  assert events == []


def test_batch_larger_than_the_data_set_is_refused_before_the_model(tmp_path, monkeypatch):
  events = _never_build(monkeypatch)
  data = tmp_path / "three.jsonl"
  data.write_text("\n".join(json.dumps(GOOD) for _ in range(3)) + "\n")
  config = demo_config(**{"data.train": str(data), "train.batch_size": 4, "mesh.data": 1})
  with pytest.raises(ConfigError, match=r"only 3 pairs, fewer than config.train.batch_size=4"):
    jmain.run(config, str(tmp_path / "w"))
  assert events == []
