"""`data.skip_bad_records` (issue 12, acceptance 5): 3 bad records of 40 are skipped, listed in
DIR/skipped.jsonl with file:line and reason, and counted in the metrics and the summary; 3 of 10
stop the run naming the share. Without the option the first bad record stops the job."""

from __future__ import annotations

import json
import os

from jaxdpo import assets
from tests._dpo_helpers import read_metrics, run_main

BAD = {
    2: '{"prompt": "transcribe : one", "chosen": "one"',                      # malformed JSON
    5: json.dumps({"prompt": "transcribe : two", "chosen": "two"}),          # no 'rejected'
    9: json.dumps({"prompt": "transcribe : three", "chosen": "three", "rejected": ""}),  # empty completion
}
ARGS = ("--config.data.skip_bad_records=True", "--config.data.max_skip_share=0.1", "--config.train.num_steps=2",
        "--config.train.batch_size=8", "--config.train.log_every=1", "--config.data.eval=")


def _data(path, n: int) -> str:
  """`n` lines: the embedded set's first records, with BAD at lines 2, 5 and 9."""
  with open(assets.path("tiny_prefs.jsonl")) as f:
    good = [line.rstrip("\n") for line in f if line.strip()]
  lines = [BAD.get(i, good[i]) for i in range(1, n + 1)]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_three_bad_of_forty_are_skipped_listed_and_counted(tmp_path):
  data = _data(tmp_path / "prefs.jsonl", 40)
  r = run_main(tmp_path / "w", f"--config.data.train={data}", *ARGS)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / "w" / "skipped.jsonl") as f:
    skipped = [json.loads(line) for line in f]
  assert [s["where"] for s in skipped] == [f"{data}:2", f"{data}:5", f"{data}:9"]
  assert "malformed JSON" in skipped[0]["reason"]
  assert "no 'rejected' field" in skipped[1]["reason"]
  assert "empty completion" in skipped[2]["reason"]
  assert all(row["data/skipped_records"] == 3 for row in read_metrics(tmp_path / "w"))
  with open(tmp_path / "w" / "summary.json") as f:
    assert json.load(f)["skipped_records"]["count"] == 3
  assert "skipped  3 bad record(s)" in r.stdout


def test_three_bad_of_ten_stop_the_run(tmp_path):
  data = _data(tmp_path / "prefs.jsonl", 10)
  r = run_main(tmp_path / "w", f"--config.data.train={data}", *ARGS)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "3 of 10 records are bad (30.0%), more than data.max_skip_share=0.1" in r.stderr
  assert os.path.exists(tmp_path / "w" / "skipped.jsonl")  # the list is there to fix the data from
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_without_the_option_the_first_bad_record_stops(tmp_path):
  data = _data(tmp_path / "prefs.jsonl", 40)
  r = run_main(tmp_path / "w", f"--config.data.train={data}", "--config.train.num_steps=2")
  assert r.returncode == 2
  assert f"{data}:2: malformed JSON" in r.stderr
