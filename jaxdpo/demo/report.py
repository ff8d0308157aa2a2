"""The demo's report: every figure recomputed from the eval stages' `generations.jsonl`.

`metrics(rows)` is the one place where a model's numbers come from; `build(...)` puts SFT, DPO
and the control side by side with the relative reductions, the mined pairs, the time per stage
and the seeds; `write(...)` renders `report.json`, `report.md` and `report.png` from that one
dict, so the three files cannot disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jiwer

from jaxdpo.generation import eval_stats

MODELS = ("sft", "dpo", "control")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def metrics(rows: Sequence[dict]) -> dict:
  """Degeneration, accuracy and length figures of one model's held-out generations.

  Word-level edit operations (the script is one token per word): substitutions, deletions and
  insertions from jiwer's alignment, summed over pages. An output "ends early" when the model
  stopped (EOS before the limit) with fewer words than the reference.
  """
  n = len(rows)
  if n == 0:
    raise ValueError("no generations to report on")
  refs = [r["reference"] for r in rows]
  hyps = [r["hypothesis"] or "" for r in rows]
  loops = sum(bool(r["is_degenerate"]) for r in rows)
  lo, hi = eval_stats.wilson_interval(loops, n)
  words = jiwer.process_words(refs, [h if h.strip() else "" for h in hyps])
  ref_len = [len(t.split()) for t in refs]
  hyp_len = [len(t.split()) for t in hyps]
  early = sum(1 for r, a, b in zip(rows, hyp_len, ref_len) if not r["hit_limit"] and a < b)
  return {
      "n": n, "loops": loops, "degeneration_rate": loops / n, "degeneration_rate_ci95": [lo, hi],
      "cer": eval_stats.cer(refs, hyps), "wer": eval_stats.wer(refs, hyps),
      "substitutions": int(words.substitutions), "deletions": int(words.deletions),
      "insertions": int(words.insertions),
      "exact": sum(h.split() == r.split() for h, r in zip(hyps, refs)),
      "exact_match_rate": sum(h.split() == r.split() for h, r in zip(hyps, refs)) / n,
      "mean_output_words": sum(hyp_len) / n, "mean_reference_words": sum(ref_len) / n,
      "ended_early": early, "ended_early_rate": early / n,
      "hit_limit": sum(bool(r["hit_limit"]) for r in rows),
  }


def _reduction(before: float, after: float) -> float | None:
  return None if before == 0 else 1.0 - after / before


def build(generations: dict[str, str], mine_summary: dict, pairs: Sequence[dict], stage_seconds: dict,
          seeds: dict, examples: int = 3) -> dict:
  """The report dict.

  Args:
    generations: {"sft" | "dpo" | "control": path of that model's held-out generations.jsonl}.
    mine_summary: the mine stage's mine_summary.json.
    pairs: the mined pairs (pairs.jsonl).
    stage_seconds: wall seconds per stage.
    seeds: every seed the run used.
    examples: loops shown (SFT's output, then DPO's and the control's on the same page).
  """
  rows = {m: read_jsonl(generations[m]) for m in MODELS}
  per = {m: metrics(rows[m]) for m in MODELS}
  if len({len(v) for v in rows.values()}) != 1 or any(
      [r["reference"] for r in rows[m]] != [r["reference"] for r in rows["sft"]] for m in MODELS):
    raise ValueError("the three evals were not run on the same held-out pages")
  sft, dpo, control = (per[m]["degeneration_rate"] for m in MODELS)
  shown = [i for i, r in enumerate(rows["sft"]) if r["is_degenerate"]][:examples]
  n_pairs = len(pairs)
  return {
      "models": per,
      "reduction": {"dpo_vs_sft": _reduction(sft, dpo), "dpo_vs_control": _reduction(control, dpo),
                    "control_vs_sft": _reduction(sft, control)},
      "pairs": {"count": n_pairs,
                "loop_share": sum(bool(p.get("rejected_is_degenerate")) for p in pairs) / n_pairs if n_pairs else 0.0,
                "hit_limit_share": sum(bool(p.get("rejected_hit_limit")) for p in pairs) / n_pairs if n_pairs else 0.0,
                "mine_records": mine_summary.get("records"), "mine_samples": mine_summary.get("samples"),
                "max_pair_length": mine_summary.get("max_pair_length")},
      "stage_seconds": dict(stage_seconds), "total_seconds": sum(stage_seconds.values()),
      "seeds": dict(seeds),
      "examples": [{"reference": rows["sft"][i]["reference"],
                    **{m: rows[m][i]["hypothesis"] for m in MODELS}} for i in shown],
      "generations": dict(generations),
  }


def _fmt(x, pct: bool = False) -> str:
  if x is None:
    return "n/a"
  return f"{100 * x:.1f}%" if pct else (f"{x:.4f}" if isinstance(x, float) else str(x))


def markdown(rep: dict) -> str:
  m = rep["models"]
  lines = ["# Degeneration study (built-in OCR pages)", "",
           "| | loops | rate (95% CI) | CER | WER | S / D / I | exact | mean words (ref) | ended early |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name in MODELS:
    r = m[name]
    lo, hi = r["degeneration_rate_ci95"]
    lines.append(f"| {name} | {r['loops']}/{r['n']} | {_fmt(r['degeneration_rate'], True)} ({_fmt(lo, True)}-"
                 f"{_fmt(hi, True)}) | {_fmt(r['cer'])} | {_fmt(r['wer'])} | {r['substitutions']} / "
                 f"{r['deletions']} / {r['insertions']} | {r['exact']}/{r['n']} | {r['mean_output_words']:.2f} "
                 f"({r['mean_reference_words']:.2f}) | {r['ended_early']}/{r['n']} |")
  red, p = rep["reduction"], rep["pairs"]
  lines += ["", f"Relative reduction of the loop rate: DPO vs SFT {_fmt(red['dpo_vs_sft'], True)}, "
            f"DPO vs control {_fmt(red['dpo_vs_control'], True)}, control vs SFT {_fmt(red['control_vs_sft'], True)}.",
            "", f"Pairs mined: {p['count']} ({_fmt(p['loop_share'], True)} loops, {_fmt(p['hit_limit_share'], True)} "
            f"hit the limit) from {p['mine_records']} pages x samples = {p['mine_samples']}; longest pair "
            f"{p['max_pair_length']} tokens.", "", "Time per stage (s): " + ", ".join(
                f"{k} {v:.1f}" for k, v in rep["stage_seconds"].items()) + f"; total {rep['total_seconds']:.1f}.",
            "", "Seeds: " + ", ".join(f"{k}={v}" for k, v in rep["seeds"].items()) + ".", "", "## Loops before, outputs after", ""]
  for ex in rep["examples"]:
    lines += [f"- reference: `{ex['reference']}`", f"  - SFT: `{ex['sft']}`", f"  - DPO: `{ex['dpo']}`",
              f"  - control: `{ex['control']}`"]
  return "\n".join(lines) + "\n"


def plot(rep: dict, path: str):
  """Loop rates with their 95% intervals, and a few loops before / outputs after."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, tx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
  rates = [rep["models"][m]["degeneration_rate"] for m in MODELS]
  lo = [r - rep["models"][m]["degeneration_rate_ci95"][0] for r, m in zip(rates, MODELS)]
  hi = [rep["models"][m]["degeneration_rate_ci95"][1] - r for r, m in zip(rates, MODELS)]
  ax.bar(MODELS, [100 * r for r in rates], yerr=[[100 * x for x in lo], [100 * x for x in hi]], capsize=6,
         color=["#888888", "#2a7ab9", "#d08c2a"])
  ax.set_ylabel("held-out pages that loop (%), 95% Wilson CI")
  ax.set_title("degeneration rate")
  tx.axis("off")
  y = 0.98
  for ex in rep["examples"]:
    for label in ("reference", "sft", "dpo", "control"):
      text = ex[label] if len(ex[label]) < 110 else ex[label][:107] + "..."
      tx.text(0.0, y, f"{label:>9}: {text}", family="monospace", fontsize=7, va="top", transform=tx.transAxes)
      y -= 0.06
    y -= 0.04
  if not rep["examples"]:
    tx.text(0.0, 0.5, "the SFT model did not loop on a held-out page", transform=tx.transAxes)
  tx.set_title("loops before (SFT) and outputs after")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(rep: dict, out_dir: str) -> dict:
  """Writes report.json, report.md and report.png into `out_dir`; returns their paths."""
  paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump(rep, f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(markdown(rep))
  plot(rep, paths["png"])
  return paths
