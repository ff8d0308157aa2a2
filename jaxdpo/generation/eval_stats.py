"""Statistics for the eval job's `eval_summary.json`: degeneration rate with its confidence
interval, CER/WER, generation lengths and the wall time lost to degenerate outputs.

Error rates are corpus-level: total edit operations over total reference length, summed over
the records that carry a reference. This is the usual OCR/ASR convention; it weights each
record by its length, so a two-character line cannot dominate, and it stays defined when some
references are empty (their hypotheses count as insertions against a length of 0). The mean
of per-record rates over non-empty references is reported alongside as `cer_mean` /
`wer_mean`. Edit counts come from `jiwer` (Levenshtein alignment); text is compared as is,
apart from jiwer's default whitespace handling (strip, collapse runs of spaces).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import jiwer
import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion k / n.

  Unlike the normal approximation it stays inside [0, 1] and is informative at k = 0, which
  matters for degeneration rates well below 1%.

  Returns:
    (lo, hi); (0.0, 1.0) when n == 0.
  """
  if not 0 <= k <= n:
    raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
  if n == 0:
    return 0.0, 1.0
  p = k / n
  z2n = z * z / n
  center = (p + z2n / 2) / (1 + z2n)
  half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
  return max(0.0, center - half), min(1.0, center + half)


def edit_counts(reference: str, hypothesis: str, unit: str = "char") -> tuple[int, int]:
  """(edit operations, reference length) at the character or word level.

  An empty reference has length 0 and every hypothesis unit is an insertion.
  """
  hypothesis = hypothesis or ""
  if unit == "char":
    out = jiwer.process_characters(reference, hypothesis)
  elif unit == "word":
    out = jiwer.process_words(reference, hypothesis)
  else:
    raise ValueError(f"unit must be 'char' or 'word', got {unit!r}")
  return (out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits)


def error_rate(references: Sequence[str], hypotheses: Sequence[str], unit: str = "char") -> float | None:
  """Corpus-level CER (`unit="char"`) or WER (`unit="word"`): Σ edits / Σ reference length.

  Returns None for an empty corpus; `inf` when every reference is empty but some hypothesis
  is not.
  """
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses")
  if not references:
    return None
  edits = length = 0
  for ref, hyp in zip(references, hypotheses):
    e, n = edit_counts(ref, hyp, unit)
    edits += e
    length += n
  if length == 0:
    return 0.0 if edits == 0 else math.inf
  return edits / length


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
  """Corpus-level character error rate (see `error_rate`)."""
  return error_rate(references, hypotheses, "char")


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
  """Corpus-level word error rate (see `error_rate`)."""
  return error_rate(references, hypotheses, "word")


def _mean_per_record(references, hypotheses, unit) -> float | None:
  rates = []
  for ref, hyp in zip(references, hypotheses):
    e, n = edit_counts(ref, hyp, unit)
    if n:
      rates.append(e / n)
  return float(np.mean(rates)) if rates else None


def attribute_time(records: Sequence[dict]) -> tuple[np.ndarray, str]:
  """Wall seconds spent on each record, and how they were attributed.

  * `wall_time_s` on every record: used as is ("record").
  * Otherwise `batch_id` and `batch_wall_time_s` on every record: each batch's time is split
    among its rows in proportion to their generated tokens ("batch_tokens"). Rows of a batch
    decode in lock step, so this is an approximation: a row that runs to the limit alone
    actually keeps the whole batch busy, which makes the degenerate share a lower bound.
  * Otherwise time is taken as proportional to generated tokens ("tokens").
  """
  tokens = np.array([r["num_generated"] for r in records], np.float64)
  if all("wall_time_s" in r for r in records):
    return np.array([r["wall_time_s"] for r in records], np.float64), "record"
  if all("batch_id" in r and "batch_wall_time_s" in r for r in records):
    rows = defaultdict(list)
    for i, r in enumerate(records):
      rows[r["batch_id"]].append(i)
    seconds = np.zeros(len(records))
    for idx in rows.values():
      batch_time = float(records[idx[0]]["batch_wall_time_s"])
      batch_tokens = tokens[idx].sum()
      seconds[idx] = batch_time * (tokens[idx] / batch_tokens if batch_tokens else 1.0 / len(idx))
    return seconds, "batch_tokens"
  return tokens, "tokens"


def early_stop_agreement(records: Sequence[dict]) -> dict:
  """How the early-stop classification (`generate.stop_on_loop`) agrees with the full-length one.

  Each record's `is_degenerate` is the early verdict (a row cut short on a confirmed loop counts
  as degenerate); `degenerate_full` (present with `generate.stop_on_loop_check`) is the study's
  verdict on the same record generated to full length.

  Returns:
    {"stopped_early", "measured", and when measured "confusion" (early x full counts), "agreement"
    (share of records where both agree), "n"}.
  """
  out = {"stopped_early": sum(bool(r.get("degenerate_early")) for r in records)}
  if not all("degenerate_full" in r for r in records):
    return dict(out, measured=False, note="set generate.stop_on_loop_check=True to measure the agreement")
  pairs = [(bool(r["is_degenerate"]), bool(r["degenerate_full"])) for r in records]
  confusion = {f"early_{'degenerate' if e else 'clean'}_full_{'degenerate' if f else 'clean'}": 0
               for e in (True, False) for f in (True, False)}
  for e, f in pairs:
    confusion[f"early_{'degenerate' if e else 'clean'}_full_{'degenerate' if f else 'clean'}"] += 1
  return dict(out, measured=True, n=len(pairs), confusion=confusion,
              agreement=sum(e == f for e, f in pairs) / len(pairs))


def summarize(records: Iterable[dict], z: float = 1.96) -> dict:
  """The eval summary over generation records.

  Each record is a dict with
    num_generated (int), hit_limit (bool), is_degenerate (bool), optional is_early_loop (bool),
    hypothesis (str), optional reference (str or None),
    and optionally timing (`wall_time_s`, or `batch_id` + `batch_wall_time_s`; see
    `attribute_time`), and with `generate.stop_on_loop` `degenerate_early` (and
    `degenerate_full`; see `early_stop_agreement`).

  Returns:
    A JSON-serialisable dict: n; degenerate / early_loop / hit_limit counts and rates; the
    Wilson interval of the degeneration rate (`degeneration_rate_ci95` at z); CER and WER
    (corpus-level, plus per-record means, plus corpus-level over non-degenerate records) over
    the `n_with_reference` records with a reference (None when there are none); generated
    token stats (mean, p50, p99, max, total); the share of generated tokens and of wall time
    spent on degenerate records.
  """
  records = list(records)
  n = len(records)
  if n == 0:
    raise ValueError("no records to summarise")
  degenerate = np.array([bool(r["is_degenerate"]) for r in records])
  k = int(degenerate.sum())
  early = sum(bool(r.get("is_early_loop", False)) for r in records)
  hit = sum(bool(r["hit_limit"]) for r in records)
  lo, hi = wilson_interval(k, n, z)

  with_ref = [r for r in records if r.get("reference") is not None]
  refs = [r["reference"] for r in with_ref]
  hyps = [r.get("hypothesis") or "" for r in with_ref]
  clean = [r for r in with_ref if not r["is_degenerate"]]
  clean_refs = [r["reference"] for r in clean]
  clean_hyps = [r.get("hypothesis") or "" for r in clean]

  tokens = np.array([r["num_generated"] for r in records], np.float64)
  seconds, attribution = attribute_time(records)
  total_seconds = float(seconds.sum())
  early_stop = {"early_stop": early_stop_agreement(records)} if any("degenerate_early" in r for r in records) else {}
  return {
      **early_stop,
      "n": n,
      "degenerate": k,
      "degeneration_rate": k / n,
      "degeneration_rate_ci95": [lo, hi],
      "ci_z": z,
      "early_loop": early,
      "early_loop_rate": early / n,
      "hit_limit": hit,
      "hit_limit_rate": hit / n,
      "n_with_reference": len(with_ref),
      "cer": cer(refs, hyps),
      "wer": wer(refs, hyps),
      "cer_mean": _mean_per_record(refs, hyps, "char"),
      "wer_mean": _mean_per_record(refs, hyps, "word"),
      "cer_non_degenerate": cer(clean_refs, clean_hyps),
      "wer_non_degenerate": wer(clean_refs, clean_hyps),
      "generated_tokens": {
          "mean": float(tokens.mean()),
          "p50": float(np.percentile(tokens, 50)),
          "p99": float(np.percentile(tokens, 99)),
          "max": int(tokens.max()),
          "total": int(tokens.sum()),
      },
      "degenerate_token_share": float(tokens[degenerate].sum() / tokens.sum()) if tokens.sum() else 0.0,
      "degenerate_time_share": float(seconds[degenerate].sum() / total_seconds) if total_seconds else 0.0,
      "time_attribution": attribution,
      "total_wall_time_s": total_seconds if attribution != "tokens" else None,
  }
