"""Bad input fails before training with an error naming the file, line and field."""

import json
import os

import pytest

from jaxdpo.cli import main as jmain
from jaxdpo.data.records import DataError
from tests._dpo_helpers import demo_config, run_main

GOOD = {"prompt": "transcribe : alpha bravo", "chosen": "alpha bravo", "rejected": "alpha alpha alpha"}


def _write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _run(tmp_path, data_path, **overrides):
  workdir = tmp_path / "work"
  config = demo_config(**{"data.train": data_path, "train.num_steps": 2, "mesh.data": 1, **overrides})
  with pytest.raises((DataError, ValueError)) as info:
    jmain.run(config, str(workdir))
  # Nothing was trained: no checkpoint and no metrics were written.
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()
  return str(info.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), '{"prompt": "x", "chosen": ', json.dumps(GOOD)])
  msg = _run(tmp_path, path)
  assert f"{path}:3" in msg and "malformed JSON" in msg


def test_record_missing_chosen(tmp_path):
  bad = {"prompt": "transcribe : cat", "rejected": "cat cat"}
  path = _write(tmp_path, [json.dumps(GOOD)] * 4 + [json.dumps(bad)])
  msg = _run(tmp_path, path)
  assert f"{path}:5" in msg and "'chosen'" in msg


def test_empty_completion(tmp_path):
  bad = dict(GOOD, rejected="   ")
  path = _write(tmp_path, [json.dumps(GOOD), json.dumps(bad)])
  msg = _run(tmp_path, path)
  assert f"{path}:2" in msg and "'rejected'" in msg and "empty completion" in msg


def test_empty_message_list_completion(tmp_path):
  bad = dict(GOOD, chosen=[{"role": "assistant", "content": ""}])
  path = _write(tmp_path, [json.dumps(bad)])
  msg = _run(tmp_path, path)
  assert f"{path}:1" in msg and "'chosen'" in msg and "empty completion" in msg


def test_prompt_longer_than_max_length_without_truncation(tmp_path):
  long = dict(GOOD, prompt="transcribe : " + " ".join(["alpha"] * 80))
  path = _write(tmp_path, [json.dumps(GOOD), json.dumps(long)])
  msg = _run(tmp_path, path, **{"data.truncation": "off", "data.max_length": 48})
  assert f"{path}:2" in msg and "'prompt'" in msg and "max_length=48" in msg


def test_long_prompt_is_truncated_when_allowed(tmp_path):
  """The same record trains when truncation keeps the end of the prompt (control for the test above)."""
  from jaxdpo.data import records, tokenize
  from tests._dpo_helpers import tokenizer
  long = dict(GOOD, prompt="transcribe : " + " ".join(["alpha"] * 80) + " bravo")
  rec = records.validate_preference("x:1", long)
  for mode, keeps_bravo in (("keep_end", True), ("keep_start", False)):
    pair = tokenize.tokenize_preference(tokenizer(), rec, max_length=48, truncation=mode)
    assert len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= 48
    tok = tokenizer()
    assert ("bravo" in tok.decode(pair.prompt)) == keeps_bravo


def test_missing_tokenizer_directory(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD)])
  msg = _run(tmp_path, path, **{"data.tokenizer": str(tmp_path / "no-such-tokenizer")})
  assert "no-such-tokenizer" in msg and "does not exist" in msg


def test_unknown_job(tmp_path):
  msg = _run(tmp_path, _write(tmp_path, [json.dumps(GOOD)]), job="dpoo")
  assert "config.job='dpoo'" in msg and "dpo" in msg


def test_cli_reports_bad_input_and_typos_with_exit_code_2(tmp_path):
  path = _write(tmp_path, ['{"prompt": 1'])
  r = run_main(tmp_path / "w1", f"--config.data.train={path}")
  assert r.returncode == 2 and f"{path}:1" in r.stderr and "Traceback" not in r.stderr
  r = run_main(tmp_path / "w2", "--config.optim.lrr=1e-6")
  assert r.returncode == 2 and "lrr" in r.stderr and "--config.optim.lrr" in r.stderr
  assert not os.path.exists(tmp_path / "w2" / "config.json")
