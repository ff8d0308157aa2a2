"""`python -m jaxdpo.bench --suite`: both sides per workload, the peer at its best settings, a ratio table.

The runs are stand-in commands here (the real bench is tested in test_bench.py); what is checked
is the plumbing: every run becomes one JSON row, a failing run becomes a row with its error and
does not end the suite, and the table's ratio is ours / peer from the same rows.
"""

import json
import sys

from jaxdpo.cli import bench_suite


def _fake(pairs_per_s):
  return [sys.executable, "-c", f"import json; print('noise'); print(json.dumps({{'pairs_per_s': {pairs_per_s}}}))"]


def test_peer_runs_at_its_best_settings_and_says_when_liger_is_missing():
  cfg = bench_suite.SuiteConfig(steps=10, batch=8)
  cmd, settings = bench_suite.peer_command("peer.py", "ocr-2k", cfg, liger_available=True)
  assert cmd[cmd.index("--grad-ckpt") + 1] == "1" and cmd[cmd.index("--liger") + 1] == "1"
  assert cmd[cmd.index("--steps") + 1] == "12" and "--workload" in cmd and "note" not in settings
  cmd, settings = bench_suite.peer_command("peer.py", "uniform-1k", cfg, liger_available=False)
  assert cmd[cmd.index("--grad-ckpt") + 1] == "0" and cmd[cmd.index("--liger") + 1] == "0"
  assert "liger" in settings["note"]


def test_suite_rows_and_ratio_table(monkeypatch):
  monkeypatch.setattr(bench_suite, "ours_command", lambda workload, cfg: _fake(6.0))
  monkeypatch.setattr(bench_suite, "peer_command",
                      lambda script, workload, cfg, liger: (_fake(2.0) if workload == "tiny" else
                                                            [sys.executable, "-c", "raise SystemExit('boom | x')"],
                                                            {"grad_ckpt": 0, "liger": 0}))
  lines = []
  rows = bench_suite.run_suite(bench_suite.SuiteConfig(workloads=("tiny", "uniform-1k"), peer_script="peer.py"),
                               emit=lines.append)
  assert [(r["side"], r["workload"]) for r in rows] == [("jaxdpo", "tiny"), ("peer", "tiny"),
                                                         ("jaxdpo", "uniform-1k"), ("peer", "uniform-1k")]
  assert [json.loads(line)["side"] for line in lines[:4]] == ["jaxdpo", "peer", "jaxdpo", "peer"]
  assert "error" in rows[3] and "boom" in rows[3]["error"]
  table = lines[-1].splitlines()
  tiny = next(r for r in table if r.startswith("| tiny "))
  assert [c.strip() for c in tiny.split("|")[1:5]] == ["tiny", "6.00", "2.00", "3.00"]
  uni = next(r for r in table if r.startswith("| uniform-1k "))
  assert "boom / x" in uni and uni.count("|") == table[0].count("|")  # the error stays in its cell
  assert "15.8" in uni and "10.50" in uni  # the target and the peer's README best
