"""Eval statistics: Wilson interval, CER/WER (jiwer), and the eval summary."""

from __future__ import annotations

import json
import math

import jiwer
import numpy as np
import pytest

from jaxdpo.generation import eval_stats as es


def test_wilson_interval_known_value():
  """k=1, n=10 at 95%: (0.0179, 0.4042), the textbook Wilson score interval."""
  lo, hi = es.wilson_interval(1, 10)
  assert lo == pytest.approx(0.017875, abs=1e-5)
  assert hi == pytest.approx(0.404150, abs=1e-5)


def test_wilson_interval_edges_and_scipy():
  """k=0 starts at 0, k=n ends at 1, n=0 is uninformative; agrees with scipy where present."""
  lo, hi = es.wilson_interval(0, 500)
  assert lo == 0.0 and hi == pytest.approx(0.0076, abs=1e-4)
  assert es.wilson_interval(20, 20)[1] == pytest.approx(1.0)
  assert es.wilson_interval(0, 0) == (0.0, 1.0)
  with pytest.raises(ValueError, match="0 <= k <= n"):
    es.wilson_interval(3, 2)
  stats = pytest.importorskip("scipy.stats")
  for k, n in [(1, 10), (7, 1000), (50, 60)]:
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = es.wilson_interval(k, n, z=1.959963984540054)
    assert (lo, hi) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))


def test_cer_wer_known_values_and_corpus_weighting():
  """One substitution in 5 chars -> CER 0.2; 1 sub + 1 ins over 3 words -> WER 2/3; corpus-level."""
  assert es.cer(["abc d"], ["abx d"]) == pytest.approx(0.2)
  assert es.wer(["a b c"], ["a x c d"]) == pytest.approx(2 / 3)
  refs, hyps = ["ab", "abcdefgh"], ["xx", "abcdefgh"]
  assert es.cer(refs, hyps) == pytest.approx(2 / 10)  # not the per-record mean (0.5)
  assert es.cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
  assert es.wer(["the cat sat", "on a mat"], ["the cat", "on the mat"]) == pytest.approx(
      jiwer.wer(["the cat sat", "on a mat"], ["the cat", "on the mat"]))


def test_empty_references():
  """Empty reference: length 0, its hypothesis counts as insertions; all-empty -> 0 or inf."""
  assert es.edit_counts("", "abc") == (3, 0)
  assert es.edit_counts("", "") == (0, 0)
  assert es.cer(["abc", ""], ["abc", "xyz"]) == pytest.approx(1.0)
  assert es.cer([""], [""]) == 0.0
  assert es.cer([""], ["x"]) == math.inf
  assert es.cer([], []) is None
  assert es.edit_counts("abc", None) == (3, 3)
  with pytest.raises(ValueError, match="references"):
    es.cer(["a"], [])


def _records():
  """9 clean records of 10 tokens and 1 degenerate record of 100 tokens (hit the limit)."""
  recs = [dict(num_generated=10, hit_limit=False, is_degenerate=False, hypothesis="hello world",
               reference="hello world") for _ in range(9)]
  recs[0]["hypothesis"] = "hello wurld"  # 1 char error, 1 word error
  recs[1]["reference"] = None            # no reference: excluded from CER/WER
  recs[2]["is_early_loop"] = True
  recs.append(dict(num_generated=100, hit_limit=True, is_degenerate=True,
                   hypothesis="hello hello hello hello", reference="hello"))
  return recs


def test_summarize_rates_errors_and_lengths():
  """Rate 1/10 with its Wilson CI, corpus CER/WER with and without the degenerate record."""
  s = es.summarize(_records())
  json.dumps(s, allow_nan=False)  # eval_summary.json must be strict JSON
  assert (s["n"], s["degenerate"], s["early_loop"], s["hit_limit"], s["n_with_reference"]) == (10, 1, 1, 1, 9)
  assert s["degeneration_rate"] == pytest.approx(0.1)
  assert s["degeneration_rate_ci95"] == [pytest.approx(0.017875, abs=1e-5), pytest.approx(0.404150, abs=1e-5)]
  # Clean: 8 refs of 11 chars with 1 error. Degenerate: ref "hello" (5), hyp adds 18 chars.
  assert s["cer_non_degenerate"] == pytest.approx(1 / 88)
  assert s["cer"] == pytest.approx((1 + 18) / (88 + 5))
  assert s["wer"] == pytest.approx((1 + 3) / (16 + 1))
  assert s["cer_mean"] == pytest.approx((1 / 11 + 18 / 5) / 9)
  g = s["generated_tokens"]
  assert (g["mean"], g["p50"], g["max"], g["total"]) == (19.0, 10.0, 100, 190)
  assert g["p99"] == pytest.approx(10 + 0.91 * 90)
  assert s["degenerate_token_share"] == pytest.approx(100 / 190)
  assert s["time_attribution"] == "tokens" and s["total_wall_time_s"] is None
  assert s["degenerate_time_share"] == pytest.approx(100 / 190)


def test_time_attribution_per_record_and_per_batch():
  """Measured per-record times are used as is; batch times are split by generated tokens."""
  recs = _records()
  for i, r in enumerate(recs):
    r["wall_time_s"] = 5.0 if r["is_degenerate"] else 1.0
  s = es.summarize(recs)
  assert s["time_attribution"] == "record"
  assert s["degenerate_time_share"] == pytest.approx(5 / 14)
  assert s["total_wall_time_s"] == pytest.approx(14.0)
  recs = _records()
  for i, r in enumerate(recs):  # batch 0: records 0-4 (50 tokens, 2 s); batch 1: 5-9 (140 tokens, 7 s)
    r["batch_id"], r["batch_wall_time_s"] = i // 5, 2.0 if i < 5 else 7.0
  seconds, how = es.attribute_time(recs)
  assert how == "batch_tokens"
  np.testing.assert_allclose(seconds, [0.4] * 5 + [0.5] * 4 + [5.0])
  s = es.summarize(recs)
  assert s["degenerate_time_share"] == pytest.approx(5 / 9)
  assert s["total_wall_time_s"] == pytest.approx(9.0)


def test_summarize_rejects_empty():
  """No records: a clear error rather than NaN rates."""
  with pytest.raises(ValueError, match="no records"):
    es.summarize([])
