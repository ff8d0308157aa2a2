"""Reference log-probs on disk (`job=ref_logps`, `dpo.reference=cache:PATH`) on a vision dataset:
the cached run trains like the live reference, holds no reference, and a stale cache is refused."""

import json
import os
import shutil

import pytest

from jaxdpo import assets
from jaxdpo.cli import main as jmain
from jaxdpo.errors import ConfigError, DataError
from jaxdpo.jobs import dpo, ref_cache
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd
import _vision_job_helpers as VH
from tests._dpo_helpers import read_metrics


def _config(ck, train, reference, **overrides):
  from jaxdpo.configs import tiny_vl
  c = tiny_vl.get_config("dpo")
  values = {"model.checkpoint": ck, "data.tokenizer": f"{ck}/tokenizer", "data.train": train,
            "dpo.reference": reference, "train.num_steps": 3, "train.log_every": 1, "train.batch_size": 2,
            "train.ckpt_every": 100, "train.progress": False, "mesh.data": 1, "optim.warmup_steps": 0, **overrides}
  for key, value in values.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("refcache")
  ck1, _ = VH.build_checkpoint("qwen2_5_vl", str(root / "a"), seed=1)
  ck2, _ = VH.build_checkpoint("qwen2_5_vl", str(root / "b"), seed=2)
  return root, ck1, ck2


def test_cache_reproduces_live_reference_and_refuses_stale(checkpoints, tmp_path):
  root, ck1, ck2 = checkpoints
  # The shipped vision pairs, copied with their pages so that one record can be edited below.
  data = tmp_path / "data"
  shutil.copytree(os.path.dirname(assets.path("tiny_vl/pairs.jsonl")), data)
  train = str(data / "pairs.jsonl")
  cache = str(tmp_path / "ref.json")
  out = jmain.run(_config(ck1, train, f"cache:{cache}", job="ref_logps"), str(tmp_path / "ref"))
  assert out["records"] == 8 and os.path.isfile(cache)

  cached = _config(ck1, train, f"cache:{cache}")
  live = _config(ck1, train, "model")
  for config, ref_bytes in ((cached, 0), (live, None)):  # the planner's reference bytes
    mesh = shd.make_mesh(config.mesh)
    plan = memory.plan_dpo(dpo.memory_run(config), mesh, ())
    assert (plan.reference == 0) if ref_bytes == 0 else (plan.reference > 0)

  jmain.run(cached, str(tmp_path / "cached"))
  jmain.run(live, str(tmp_path / "live"))
  a, b = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "live")
  assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
  # Rewards relative to the run's reward scale: at step 1 the live reference *is* the policy
  # (exact zeros) while the cache holds a separately compiled forward's values (~1e-7 apart).
  reward_keys = ("rewards/chosen", "rewards/rejected", "rewards/margins")
  reward_scale = max(abs(m[k]) for m in b for k in reward_keys)
  for x, y in zip(a, b):
    for key in ("loss", "logps/chosen", "logps/rejected") + reward_keys:
      scale = reward_scale if key in reward_keys else abs(y[key])
      assert abs(x[key] - y[key]) <= 1e-5 * scale, (x["step"], key, x[key], y[key])
  assert b[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference

  # Stale: another checkpoint, then an edited record (refused before any model is built).
  with pytest.raises(ConfigError, match=r"stale reference cache: computed from the reference checkpoint 'sha256:"):
    jmain.run(_config(ck2, train, f"cache:{cache}"), str(tmp_path / "other-ckpt"))
  lines = (data / "pairs.jsonl").read_text().splitlines()
  record = json.loads(lines[2])
  record["chosen"] = record["chosen"] + " ink"
  lines[2] = json.dumps(record)
  (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"no cached reference log-probs for .*pairs.jsonl:3"):
    jmain.run(cached, str(tmp_path / "edited"))


def test_image_bytes_are_part_of_the_key(tmp_path):
  from jaxdpo.data.tokenize import TokenizedPair
  a, b = VH.write_png(str(tmp_path / "a.png"), (16, 16), 0), VH.write_png(str(tmp_path / "b.png"), (16, 16), 1)
  pair = TokenizedPair("x:1", [1, 2], [3], [4], images=(a,))
  same = TokenizedPair("y:9", [1, 2], [3], [4], images=(a,))
  assert ref_cache.record_key(pair) == ref_cache.record_key(same)  # where it came from does not matter
  assert ref_cache.record_key(pair) != ref_cache.record_key(TokenizedPair("x:1", [1, 2], [3], [4], images=(b,)))
  assert ref_cache.record_key(pair) != ref_cache.record_key(TokenizedPair("x:1", [1, 2], [3], [5], images=(a,)))


def test_ref_logps_job_on_a_mesh_matches_one_device(checkpoints, tmp_path):
  """The precompute runs sharded over the mesh (8 fake devices, one pair each) and writes the
  values one device computes."""
  _, ck1, _ = checkpoints
  train = assets.path("tiny_vl/pairs.jsonl")
  one, eight = str(tmp_path / "one.json"), str(tmp_path / "eight.json")
  jmain.run(_config(ck1, train, f"cache:{one}", job="ref_logps"), str(tmp_path / "w1"))
  jmain.run(_config(ck1, train, f"cache:{eight}", job="ref_logps", **{"mesh.data": 8, "train.batch_size": 8}),
            str(tmp_path / "w8"))
  rows = [json.load(open(p))["records"] for p in (one, eight)]
  assert [r["key"] for r in rows[0]] == [r["key"] for r in rows[1]] and len(rows[0]) == 8
  for a, b in zip(*rows):
    scale = max(abs(v) for v in a["logps"])
    assert max(abs(x - y) for x, y in zip(a["logps"], b["logps"])) <= 1e-5 * scale, (a, b)
