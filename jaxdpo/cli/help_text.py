"""`python -m jaxdpo.main --help`: usage, jobs, shipped configs and every config key.

The key list is generated from `jaxdpo.jobs.defaults` (each key's default from `base()`, its
comment from the line that sets it), so the help cannot drift from the keys the jobs read.
"""

from __future__ import annotations

import inspect
import os
import re

from jaxdpo.cli import config_paths

USAGE = """usage: python -m jaxdpo.main --config CONFIG.py[:arg] --workdir DIR [--config.KEY=VALUE ...]

  --config    an experiment config: a path, or the name of a shipped config (any directory)
  --workdir   checkpoints, metrics.jsonl, config.json, summary.json and the job's outputs
  --config.KEY=VALUE   override one config key (a misspelt key fails and names it)
  --help      this text

Re-running the same command resumes from DIR's latest checkpoint; Ctrl-C or SIGTERM saves a
checkpoint at the next step boundary (a second Ctrl-C aborts at once)."""

# One line per job; tests check that these names are exactly the job table's.
JOBS = {
    "dpo": "preference optimisation on {prompt, chosen, rejected} records (data.train)",
    "sft": "supervised fine-tuning on {prompt, completion} records (data.train)",
    "eval": "greedy or sampled generations on data.prompts + a degeneration summary",
    "mine": "preference pairs from the model's own degenerate samples on data.prompts",
    "ref_logps": "the reference log-probs of data.train (+ data.eval) written to disk, for dpo.reference=cache:PATH",
    "demo": "the study on rendered pages: SFT, eval, mine, DPO, control, eval, report (demo_degeneration.py)",
}

_ASSIGN = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=.*?(?:#\s?(?P<comment>.*))?$")
_CONTINUATION = re.compile(r"^\s+#\s?(?P<comment>.*)$")


def key_comments(source: str) -> dict[str, str]:
  """{dotted key: comment} from `c.a.b = value  # comment` lines (and indented comment lines under them)."""
  out: dict[str, str] = {}
  last, indent = None, 0
  for line in source.splitlines():
    m = _ASSIGN.match(line)
    if m:
      last, indent = m.group(1), len(line) - len(line.lstrip())
      if m.group("comment"):
        out[last] = m.group("comment").strip()
      continue
    c = _CONTINUATION.match(line)
    if c and last in out and line.index("#") > indent + 4:  # a trailing comment carried on the next line
      out[last] += " " + c.group("comment").strip()
    else:
      last = None
  return out


def config_keys() -> list[tuple[str, object, str]]:
  """(dotted key, default, comment) for every key of `defaults.base()`, in definition order."""
  from jaxdpo.jobs import defaults
  comments = key_comments(inspect.getsource(defaults))
  rows = []

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if hasattr(v, "items"):
        walk(key + ".", v)
      else:
        rows.append((key, v, comments.get(key, "")))
  walk("", defaults.base())
  return rows


def render() -> str:
  """The full help text."""
  lines = [USAGE, "", "jobs (config.job):"]
  width = max(map(len, JOBS))
  lines += [f"  {name:{width}s} {what}" for name, what in JOBS.items()]
  lines += ["", "shipped configs (--config NAME.py, or configs/NAME.py from the repository root):"]
  width = max(len(n) for n in config_paths.shipped())
  lines += [f"  {name:{width}s}  {doc}" for name, doc in config_paths.shipped().items()]
  lines += ["", "config keys (--config.KEY=VALUE), with their defaults:"]
  rows = config_keys()
  package_dir = os.path.dirname(config_paths.SHIPPED_DIR)
  key_width = max(len(k) for k, _, _ in rows)
  for key, default, comment in rows:
    if isinstance(default, str) and default.startswith(package_dir):
      default = "<jaxdpo>" + default[len(package_dir):]  # files shipped in the package
    shown = repr(default) if isinstance(default, str) else str(default)
    lines.append(f"  {key:{key_width}s} = {shown}" + (f"    # {comment}" if comment else ""))
  return "\n".join(lines) + "\n"
