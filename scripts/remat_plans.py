"""Memory per `train.remat` policy for the bench workloads: the planner's, and optionally XLA's.

  python scripts/remat_plans.py uniform-1k ocr-2k uniform-1k-gemma      # planner only (seconds)
  python scripts/remat_plans.py --compiled uniform-1k --policies full,save_qkv_proj   # + compile each

One JSON line per (workload, policy, scan). The planner (`memory.plan_dpo`) runs on one device with
the bench's settings (8 pairs, bf16 compute, XLA attention, live reference); it sizes the reference
at the parameter dtype, so `total_gb_bf16_ref` also gives the total with the bench's bf16 reference.
`--compiled` adds `bench --analyze`'s compiled plan (scan on, no FLOP count): the current backend's.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxdpo.cli import bench, bench_analyze
from jaxdpo.models import decoder, registry, remat
from jaxdpo.parallel import memory
from jaxdpo.parallel import sharding as shd
from jaxdpo.train import optim

GB = 2**30


def planner_rows(workload: str, policies, scans=(False, True)):
  w = bench.WORKLOADS[workload]()
  ocfg = ConfigDict(dict(lr=1e-6, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                         weight_decay=0.0, max_grad_norm=1.0))
  tx, _ = optim.make_optimizer(ocfg, 12)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  seq = w.prompt[1] + max(w.chosen[1], w.rejected[1])
  for scan in scans:
    for name in policies:
      run = memory.DPORun(family=registry.get_family(w.family), model_cfg=w.model, param_dtype=np.dtype("float32"),
                          compute_dtype=jnp.bfloat16, attention_impl="xla", tx=tx, reference_model=True, batch_size=8,
                          grad_accum=1, seq_len=seq, logprob_chunk=256, remat=name, scan_layers=scan)
      p = memory.plan_dpo(run, mesh)
      yield {"workload": workload, "remat": name, "scan": scan, "source": "planner",
             "activations_gb": round(p.activations / GB, 2), "total_gb": round(p.total / GB, 2),
             "total_gb_bf16_ref": round((p.total - p.reference // 2) / GB, 2)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workloads", nargs="+", choices=sorted(bench.WORKLOADS))
  ap.add_argument("--policies", default=",".join(remat.POLICIES))
  ap.add_argument("--compiled", action="store_true", help="also compile the scanned step per policy (minutes each)")
  args = ap.parse_args(argv)
  policies = [p for p in args.policies.split(",") if p]
  for workload in args.workloads:
    for row in planner_rows(workload, policies):
      print(json.dumps(row), flush=True)
    if args.compiled:
      for name in policies:
        out = bench_analyze.analyze(workload, batch=8, reference="model", param_dtype="float32",
                                    compute_dtype="bfloat16", chunk=256, count_flops=False,
                                    blocks=decoder.BlockPlan(remat=name, scan=True))
        print(json.dumps({"workload": workload, "remat": name, "scan": True, "source": "compiled",
                          "planned_peak_gb": out["planned_peak_gb"], "planned_gb": out["planned_gb"],
                          "compile_s": out["compile_s"]}), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
