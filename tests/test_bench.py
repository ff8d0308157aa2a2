"""`python -m jaxdpo.bench` runs a workload and reports the fields the speed work relies on.

No timing is asserted: speed is measured by the bench, never by tests.
"""

import json

import numpy as np
import pytest

from jaxdpo.cli import bench


def test_bench_reports_throughput_and_peer_ratio(tmp_path, capsys):
  peer = tmp_path / "peer.jsonl"
  peer.write_text(json.dumps({"peer": "trl-x", "pairs_per_s": 2.0, "jaxdpo_workload": "ocr-tiny"}) + "\n")
  assert bench.main(["--workload", "ocr-tiny", "--steps", "1", "--warmup", "1", "--batch", "4",
                     "--compute-dtype", "float32", "--peer-json", str(peer)]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["workload"] == "ocr-tiny" and out["steps_timed"] == 1 and out["params"] == 138304
  assert out["pairs_per_s"] > 0 and out["tokens_per_s"] > 0 and 0 < out["mfu_vs_peak"] < 1
  assert out["speedup_vs_peer"] == out["pairs_per_s"] / 2.0
  assert np.isfinite(out["loss"])


def test_ocr_workload_matches_its_definition():
  w = bench.WORKLOADS["ocr-2k"]()
  batches = bench.synthetic_batches(w, 8, 4, vocab=1000, layout="pairs")
  shared = bench.synthetic_batches(w, 8, 4, vocab=1000)  # the bench's default layout, same pairs
  for (b, useful), (s, s_useful) in zip(batches, shared):
    # One row [P | C | R] per pair holds each prompt once: the two rows' tokens minus one prompt each.
    assert s_useful == useful and s["input_ids"].shape == (8, 1280 + 1024 + 1024)
    assert int(s["segment_ids"].sum()) == useful - int((b["segment_ids"] - b["loss_mask"])[:, 0].sum())
    assert b["input_ids"].shape == (8, 2, 1280 + 1024)
    lengths = b["segment_ids"].sum(-1)  # [B, 2]
    completions = b["loss_mask"].sum(-1)
    prompts = lengths - completions
    assert useful == int(lengths.sum())
    assert ((prompts[:, 0] >= 256) & (prompts[:, 0] <= 1280)).all() and (prompts[:, 0] == prompts[:, 1]).all()
    assert ((completions >= 64) & (completions <= 1024)).all()
    # Max-length rejected completions are loops of an 8-token phrase.
    for i in np.flatnonzero(completions[:, 1] == 1024):
      comp = b["input_ids"][i, 1, prompts[i, 1]:lengths[i, 1]]
      np.testing.assert_array_equal(comp[8:], comp[:-8])


def test_cached_reference_times_the_precompute_pass_apart(capsys):
  assert bench.main(["--workload", "tiny", "--steps", "1", "--warmup", "1", "--batch", "2", "--compute-dtype",
                     "float32", "--reference", "cached", "--mu-dtype", "bfloat16"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["reference"] == "cached" and out["mu_dtype"] == "bfloat16"
  assert out["ref_precompute_s_per_batch"] > 0 and out["ref_precompute_pairs_per_s"] > 0
  assert out["completion_window"] == 64  # the tiny workload's completions: 64 of T-1 = 127 positions
  assert np.isfinite(out["loss"])


def test_bench_generate_reports_every_mode(capsys):
  """`--generate` on a tiny workload: four modes side by side, refill exact, early stop a prefix."""
  assert bench.main(["--generate", "--prompts", "10", "--batch", "4", "--max-new-tokens", "64"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines() if x.startswith("{")]
  by_mode = {r["mode"]: r for r in lines if "mode" in r}
  assert sorted(by_mode) == ["hf_generate", "refill", "refill+stop_on_loop", "static"]
  assert all(r["prompts_per_s"] > 0 and r["looping_prompts"] == 1 for r in by_mode.values())
  assert by_mode["refill"]["same_as_static"] and by_mode["hf_generate"]["same_as_static"]
  assert by_mode["refill+stop_on_loop"]["prefix_of_static"]
  assert 0 <= by_mode["refill+stop_on_loop"]["early_vs_full_agreement"] <= 1
  assert set(lines[-1]["summary"]) == set(by_mode)


def test_params_stacked_runs_the_same_steps(capsys):
  """`--params-stacked`: the train state over stacked layers gives the per-layer state's losses (fp32); auto
  follows the layer scan; "on" without the scan is refused by name."""
  base = ["--workload", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--compute-dtype", "float32",
          "--scan-layers", "on"]
  out = {}
  for flag in ("auto", "off"):
    assert bench.main(base + ["--params-stacked", flag]) == 0
    out[flag] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["auto"]["params_stacked"] and out["auto"]["ref_stacked"]
  assert not out["off"]["params_stacked"] and not out["off"]["ref_stacked"]
  assert abs(out["auto"]["loss"] - out["off"]["loss"]) <= 1e-6 * abs(out["off"]["loss"])
  plan = bench.block_plan("tiny", "none", "auto")  # the tiny workloads are not scanned
  assert bench.stacked_flags(plan, "auto", "auto") == (False, False)
  with pytest.raises(ValueError, match="--params-stacked on needs the layer scan"):
    bench.stacked_flags(plan, "on", "auto")
