"""`config.job = "ref_logps"`: the reference log-probs of every DPO pair, written once to disk.

The reference is the initial policy (`config.model`), run sharded over the mesh batch by batch
with a progress bar, on `data.train` and `data.eval` tokenized exactly as the DPO job tokenizes
them. The file goes to PATH of `dpo.reference=cache:PATH`, else `DIR/ref_logps.json`; a DPO run
with `--config.dpo.reference=cache:PATH` then holds no reference model (`jaxdpo.jobs.ref_cache`).
"""

from __future__ import annotations

import logging
import os

import jax

from jaxdpo.jobs import dpo, ref_cache

log = logging.getLogger("jaxdpo")


def run(config, workdir: str) -> dict:
  """Computes and writes the cache; returns {"path", "records"}."""
  p = dpo.prepare(config, workdir, check_cache=False)
  pairs = dpo.precompute_reference(p.bundle, p.train_examples, p.scfg, p.mesh, config.train.batch_size, p.collate,
                                   "train")
  if p.eval_examples:
    pairs += dpo.precompute_reference(p.bundle, p.eval_examples, p.scfg, p.mesh, config.train.batch_size, p.collate,
                                      "eval")
  path = ref_cache.cache_path(config.dpo.reference) or os.path.join(workdir, ref_cache.FILE_NAME)
  if jax.process_index() == 0:
    ref_cache.write(path, pairs, ref_cache.checkpoint_id(config.model, config.seed),
                    ref_cache.settings_of(config, dpo.loss_config(config)))
  log.info("reference log-probs of %d pairs written to %s", len(pairs), path)
  return {"path": path, "records": len(pairs)}
