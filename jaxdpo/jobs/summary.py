"""The end of a training run: one summary on stdout and in `DIR/summary.json`.

The summary says how far the run got, the last logged loss and accuracy, the held-out metrics
when there are any, where the model and the metrics went, and the command that exports the
model to a Hugging Face directory.
"""

from __future__ import annotations

import json
import os
import shlex

import jax

_HEADLINE = ("loss", "rewards/accuracies", "rewards/margins", "tokens")
_EVAL_SHOWN = tuple(f"eval/{k}" for k in _HEADLINE + ("degeneration_rate",))


def write(config, workdir: str, outcome: dict, last: dict, model_dir: str | None) -> dict:
  """Writes `workdir/summary.json` and prints the summary (process 0); returns the summary dict."""
  workdir = os.path.abspath(workdir)
  summary = {
      "job": config.job,
      "steps": outcome.get("step"),
      "num_steps": config.train.num_steps,
      "stopped": outcome.get("reason"),
      "final": {k: last[k] for k in _HEADLINE if k in last},
      "eval": {k: v for k, v in last.items() if k.startswith("eval/")},
      "checkpoint": outcome.get("checkpoint"),
      "model": model_dir,
      "metrics": os.path.join(workdir, "metrics.jsonl"),
      "config": os.path.join(workdir, "config.json"),
      "export_command": None,
  }
  if "data/skipped_records" in last:  # data.skip_bad_records
    summary["skipped_records"] = {"count": int(last["data/skipped_records"]),
                                  "list": os.path.join(workdir, "skipped.jsonl")}
  # jax-to-hf needs an HF config: the source's, or one derived from the preset (families with config_to_hf).
  if model_dir and os.path.exists(os.path.join(model_dir, "hf_config.json")):
    summary["export_command"] = (f"python -m jaxdpo.convert jax-to-hf --ckpt {shlex.quote(model_dir)} "
                                 f"--out {shlex.quote(os.path.join(workdir, 'hf'))}")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json.tmp"), "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(os.path.join(workdir, "summary.json.tmp"), os.path.join(workdir, "summary.json"))
    print(render(summary), flush=True)
  return summary


def _fmt(metrics: dict) -> str:
  return "  ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items())


def render(summary: dict) -> str:
  """The summary as the few lines printed at the end of a run."""
  state = ("finished" if summary["stopped"] == "finished" else
           f"stopped ({summary['stopped']})")
  lines = [f"{summary['job']} {state} at step {summary['steps']}/{summary['num_steps']}"]
  if summary["final"]:
    lines.append(f"  final    {_fmt(summary['final'])}")
  shown = {k: summary["eval"][k] for k in _EVAL_SHOWN if k in summary["eval"]}  # summary.json has them all
  if shown:
    lines.append(f"  held-out {_fmt(shown)}")
  if summary["model"]:
    lines.append(f"  model    {summary['model']}  (--config.model.checkpoint for the next job)")
  else:
    lines.append(f"  checkpoint {summary['checkpoint']}  (re-run the same command to continue)")
  lines.append(f"  metrics  {summary['metrics']}")
  if "skipped_records" in summary:
    skipped = summary["skipped_records"]
    lines.append(f"  skipped  {skipped['count']} bad record(s), listed in {skipped['list']}")
  if summary["export_command"]:
    lines.append(f"  export   {summary['export_command']}")
  elif summary["model"]:
    lines.append("  export   not available: no HF config.json could be derived for this model (see the warning above)")
  return "\n".join(lines)
