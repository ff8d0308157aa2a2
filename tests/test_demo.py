"""The README's first command: DPO on the embedded default learns the embedded set."""

import json

from tests._dpo_helpers import ROOT, read_metrics, run_main

KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "step", "lr", "grad_norm"}


def test_readme_demo_converges(tmp_path):
  with open(f"{ROOT}/README.md") as f:
    readme = f.read()
  assert "python -m jaxdpo.main --config configs/tiny_dpo.py --workdir /tmp/jaxdpo-demo" in readme
  r = run_main(tmp_path / "demo")  # exactly the embedded default, no overrides but the progress bar
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_metrics(tmp_path / "demo")
  assert all(KEYS <= set(row) for row in rows)
  first, last = rows[0], rows[-1]
  assert last["step"] == 150
  assert last["rewards/accuracies"] > 0.9 and last["loss"] < 0.3
  assert first["loss"] > last["loss"]
  with open(tmp_path / "demo" / "config.json") as f:
    assert json.load(f)["job"] == "dpo"
