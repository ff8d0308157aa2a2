"""The package layering (issue 9), enforced by parsing every import of `jaxdpo/` with `ast`.

Rules:
  order  cli -> jobs -> {train, objectives, data, generation} -> {models, parallel}: a module
         never imports a package of a higher layer.
  1      models/ imports nothing of jaxdpo outside models/, except the axis rules
         (jaxdpo.parallel.sharding) and jaxdpo.errors.
  2      data/ imports no job, loop, objective or cli module, and reaches a model family only
         through jaxdpo.models.registry.
  3      objectives/ and train/ import no family module, the objectives do not import the loop
         kit (train/), and neither package's text mentions a family or its batch keys.
  4      jobs/sft.py does not import jobs/dpo.py.
Function-level (lazy) imports count like top-level ones. Each rule has a negative control: a
synthetic package written to tmp_path that breaks it is flagged.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# Layer of each top-level piece of the package; higher layers may import lower ones only.
LAYERS = {
    "cli": 3, "main": 3, "convert": 3, "bench": 3, "api": 3, "configs": 3,
    "jobs": 2,
    "train": 1, "objectives": 1, "data": 1, "generation": 1, "demo": 1,
    "models": 0, "parallel": 0, "errors": 0, "assets": 0,
}
MODELS_MAY_IMPORT = ("jaxdpo.models", "jaxdpo.parallel.sharding", "jaxdpo.errors")
FAMILY_WORDS = re.compile(r"qwen|gemma|image_grid_thw|num_images", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Edge:
  """`importer` (a module of the package) imports `target` at `path:line`."""

  importer: str
  target: str
  path: str
  line: int

  def __str__(self):
    return f"{self.path}:{self.line}: {self.importer} imports {self.target}"


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def family_packages(root: pathlib.Path) -> set[str]:
  """Sub-packages of jaxdpo/models (one per family)."""
  models = root / "jaxdpo" / "models"
  return {f"jaxdpo.models.{p.name}" for p in models.iterdir() if (p / "__init__.py").exists()} if models.exists() \
      else set()


def imports(root: pathlib.Path) -> list[Edge]:
  """Every import of a jaxdpo module by a module under `root/jaxdpo` (relative ones resolved).

  `from a.b import c` yields `a.b.c` when that is a module of the tree, else `a.b`.
  """
  modules = {module_name(root, p) for p in (root / "jaxdpo").rglob("*.py")}
  edges = []
  for path in sorted((root / "jaxdpo").rglob("*.py")):
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = str(path.relative_to(root))
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = package.split(".")[:len(package.split(".")) - node.level + 1]
          mod = ".".join(base + ([node.module] if node.module else []))
        else:
          mod = node.module or ""
        targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
      edges += [Edge(name, t, rel, node.lineno) for t in targets if t == "jaxdpo" or t.startswith("jaxdpo.")]
  return edges


def top(module: str) -> str:
  return module.split(".")[1] if module.count(".") else ""


def within(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def order_violations(root, edges) -> list[str]:
  out = []
  for e in edges:
    a, b = top(e.importer), top(e.target)
    if not a or not b or a == b:
      continue
    if a not in LAYERS or b not in LAYERS:
      out.append(f"{e}: {(a if a not in LAYERS else b)!r} has no place in the layer table (tests/test_layering.py)")
    elif LAYERS[b] > LAYERS[a]:
      out.append(f"{e}: layer {a} ({LAYERS[a]}) imports the higher layer {b} ({LAYERS[b]})")
  return out


def rule1_violations(root, edges) -> list[str]:
  return [f"{e}: models/ may import only {MODELS_MAY_IMPORT}" for e in edges
          if within(e.importer, "jaxdpo.models") and not any(within(e.target, p) for p in MODELS_MAY_IMPORT)]


def rule2_violations(root, edges) -> list[str]:
  families = family_packages(root)
  out = []
  for e in edges:
    if not within(e.importer, "jaxdpo.data"):
      continue
    if top(e.target) in ("jobs", "train", "objectives", "cli"):
      out.append(f"{e}: data/ imports no job, loop, objective or cli module")
    if any(within(e.target, f) for f in families) or e.target == "jaxdpo.models.families":
      out.append(f"{e}: data/ reaches a model family only through jaxdpo.models.registry")
  return out


def rule3_violations(root, edges) -> list[str]:
  families = family_packages(root) | {"jaxdpo.models.families"}
  out = []
  for e in edges:
    if top(e.importer) not in ("objectives", "train"):
      continue
    if any(within(e.target, f) for f in families):
      out.append(f"{e}: objectives/ and train/ import no family module")
    if top(e.importer) == "objectives" and top(e.target) == "train":
      out.append(f"{e}: objectives/ hold loss and metric terms only; the update assembly lives in train/")
  for package in ("objectives", "train"):
    for path in sorted((root / "jaxdpo" / package).rglob("*.py")):
      for i, line in enumerate(path.read_text().splitlines(), 1):
        m = FAMILY_WORDS.search(line)
        if m:
          out.append(f"{path.relative_to(root)}:{i}: mentions {m.group(0)!r} (family knowledge outside models/)")
  return out


def rule4_violations(root, edges) -> list[str]:
  return [f"{e}: SFT does not import the DPO job (shared helpers live in jaxdpo.jobs.common)" for e in edges
          if e.importer == "jaxdpo.jobs.sft" and within(e.target, "jaxdpo.jobs.dpo")]


RULES = {"order": order_violations, "rule1": rule1_violations, "rule2": rule2_violations,
         "rule3": rule3_violations, "rule4": rule4_violations}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_repository_obeys(rule):
  found = RULES[rule](REPO, imports(REPO))
  assert not found, f"{rule} broken:\n" + "\n".join(found)


def test_import_parser_sees_lazy_and_relative_imports(tmp_path):
  _write(tmp_path, {
      "jaxdpo/__init__.py": "",
      "jaxdpo/data/__init__.py": "",
      "jaxdpo/data/a.py": "def f():\n  from . import b\n  import jaxdpo.models.registry\n",
      "jaxdpo/data/b.py": "",
      "jaxdpo/models/__init__.py": "",
      "jaxdpo/models/registry.py": "",
  })
  assert {(e.importer, e.target, e.line) for e in imports(tmp_path)} == {
      ("jaxdpo.data.a", "jaxdpo.data.b", 2), ("jaxdpo.data.a", "jaxdpo.models.registry", 3)}


# Negative controls: one synthetic package per rule, each module breaking it once.
BROKEN = {
    "order": {"jaxdpo/parallel/plan.py": "def f():\n  from jaxdpo.jobs import model_setup\n"},
    "rule1": {"jaxdpo/models/io2.py": "from jaxdpo.data import records\n"},
    "rule2": {"jaxdpo/data/vis.py": "from jaxdpo.models.fam import rope\n",
              "jaxdpo/data/vis2.py": "def f():\n  import jaxdpo.jobs.model_setup\n"},
    "rule3": {"jaxdpo/objectives/step.py": "from jaxdpo.train import update\n",
              "jaxdpo/train/loop2.py": "KEY = 'image_grid_THW'\n"},
    "rule4": {"jaxdpo/jobs/sft.py": "from jaxdpo.jobs import dpo as dpo_job\n"},
}
BASE = {f"jaxdpo/{p}/__init__.py": "" for p in ("", "data", "models", "models/fam", "objectives", "train", "jobs",
                                                  "parallel")} | {
    "jaxdpo/models/fam/rope.py": "", "jaxdpo/jobs/dpo.py": "", "jaxdpo/jobs/model_setup.py": "",
    "jaxdpo/data/records.py": "", "jaxdpo/train/update.py": ""}


def _write(root: pathlib.Path, files: dict):
  for rel, text in files.items():
    p = root / rel.replace("//", "/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_negative_control_is_flagged(tmp_path, rule):
  _write(tmp_path, BASE)
  assert not RULES[rule](tmp_path, imports(tmp_path)), "the clean synthetic base must pass"
  _write(tmp_path, BROKEN[rule])
  found = RULES[rule](tmp_path, imports(tmp_path))
  for rel in BROKEN[rule]:
    assert any(rel in f for f in found), f"{rule}: {rel} not flagged; found {found}"
