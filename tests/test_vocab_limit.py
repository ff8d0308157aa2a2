"""Generation never emits an id the tokenizer lacks, even when the model's vocabulary is larger."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdpo import assets
from jaxdpo.data import records, tokenize
from jaxdpo.generation import decode as gen
from jaxdpo.generation import sampling as sampling_run
from jaxdpo.models.qwen2_5_vl import config as qwen_config
from jaxdpo.models.qwen2_5_vl.model import Qwen2Decoder


@pytest.fixture(scope="module")
def tok():
  return tokenize.load_tokenizer(assets.path("tiny_tokenizer"))


@pytest.fixture(scope="module")
def model():
  return Qwen2Decoder(qwen_config.tiny(), rngs=nnx.Rngs(0))  # 512 rows


def _inputs(rows: int = 8, length: int = 6):
  rng = np.random.RandomState(0)
  return {"input_ids": rng.randint(1, 60, (rows, length)).astype(np.int32),
          "segment_ids": np.ones((rows, length), np.int32)}


def test_model_is_larger_than_the_tokenizer(tok, model):
  assert len(tok) < qwen_config.tiny().vocab_size
  # Without a limit, sampling from the random model does pick rows the tokenizer lacks: the test
  # below would fail without the mask.
  out = gen.generate(model, _inputs(), max_new_tokens=16, eos_token_id=10_000, pad_token_id=0,
                     rng=jax.random.key(1), temperature=1.0)
  assert (np.asarray(out.tokens) >= len(tok)).mean() > 0.5


@pytest.mark.parametrize("mode", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=2.0, top_k=400),
                                  dict(temperature=1.5, top_p=0.95)])
def test_sampling_never_yields_out_of_tokenizer_ids(tok, model, mode):
  limit = len(tok)
  for seed in range(3):
    out = gen.generate(model, _inputs(), max_new_tokens=16, eos_token_id=10_000, pad_token_id=0,
                       rng=jax.random.key(seed), vocab_limit=limit, **mode)
    tokens = np.asarray(out.tokens)
    assert tokens.max() < limit, (mode, seed, tokens.max())
    assert len(np.unique(tokens)) > 1  # the mask did not collapse the choice to one id


def test_jobs_generation_masks_and_warns(tok, model, caplog):
  recs = [records.Record(f"p:{i}", {"prompt": f"transcribe : {w}", "reference": w})
          for i, w in enumerate(["alpha bravo", "red green blue", "one two", "cat dog"])]
  items = [(r, tokenize.tokenize_prompt(tok, r, max_prompt_length=16)) for r in recs]
  rows = sampling_run.run_generation(model, tok, items, params=sampling_run.SamplingParams(12, temperature=1.0),
                                     batch_size=4, max_prompt_length=16, num_samples=3, progress=False)
  assert all(t < len(tok) for r in rows for t in r["tokens"])
  with caplog.at_level(logging.WARNING, logger="jaxdpo"):
    msg = sampling_run.warn_vocab_mismatch(tok, qwen_config.tiny(), "tiny_tokenizer")
  assert msg and f"{len(tok)} tokens" in msg and "512" in msg and msg in caplog.text
  matching = qwen_config.Qwen2TextConfig(**{**qwen_config.tiny().__dict__, "vocab_size": len(tok)})
  assert sampling_run.warn_vocab_mismatch(tok, matching, "tiny_tokenizer") is None
