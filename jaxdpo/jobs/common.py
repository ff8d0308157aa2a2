"""Pieces every training job shares (DPO, SFT): checks and settings read from the ConfigDict."""

from __future__ import annotations

from jaxdpo.data import records
from jaxdpo.jobs import model_setup


def check_vocab(tok, model_cfg, where: str):
  """Refuses a tokenizer with ids beyond the model's embedding table (they would index garbage)."""
  vocab = getattr(model_cfg, "vocab_size", None) or getattr(getattr(model_cfg, "text", None), "vocab_size", None)
  if vocab is not None and len(tok) > vocab:
    raise records.DataError(f"{where}: tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}")


def compute_settings(config) -> dict:
  """The step settings every objective takes: compute dtype, micro-batches, log-prob chunk."""
  return dict(compute_dtype=model_setup.dtype_of(config.model.compute_dtype), grad_accum=config.train.grad_accum,
              logprob_chunk=config.train.logprob_chunk)
