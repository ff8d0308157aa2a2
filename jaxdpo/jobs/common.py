"""Pieces the jobs share: checks and settings read from the ConfigDict."""

from __future__ import annotations

from jaxdpo.data import records
from jaxdpo.data.vision import adapters
from jaxdpo.jobs import model_setup
from jaxdpo.models import registry


def check_vocab(tok, model_cfg, where: str):
  """Refuses a tokenizer with ids beyond the model's embedding table (they would index garbage)."""
  vocab = getattr(model_cfg, "vocab_size", None) or getattr(getattr(model_cfg, "text", None), "vocab_size", None)
  if vocab is not None and len(tok) > vocab:
    raise records.DataError(f"{where}: tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}")


def compute_settings(config, family: registry.Family) -> dict:
  """The step settings every objective takes: compute dtype, micro-batches, log-prob chunk and
  the family's batch layout (`Family.model_inputs`)."""
  return dict(compute_dtype=model_setup.dtype_of(config.model.compute_dtype), grad_accum=config.train.grad_accum,
              logprob_chunk=config.train.logprob_chunk, model_inputs=family.model_inputs)


def vision_adapter(config, tok) -> adapters.VisionAdapter | None:
  """The image adapter of `config.model`'s family (None for text-only families)."""
  family, model_cfg = model_setup.resolve_model(config.model)
  d = config.data
  return adapters.adapter_for(family, model_cfg, tok, d.tokenizer, adapters.Budget(int(d.max_images),
                                                                                   int(d.max_patches)))
