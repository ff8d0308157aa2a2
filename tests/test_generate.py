"""Generation: greedy parity with transformers, per-row EOS stop, sampling, compile caching."""

from __future__ import annotations

import jax
import jax.monitoring
import numpy as np
import pytest
from flax import nnx

from _gen_helpers import VOCAB, hf_greedy, left_padded_batch, tiny_qwen2_pair
from jaxdpo.generation import decode as gen
from jaxdpo.models.qwen2_5_vl import config as qwen_config
from jaxdpo.models.qwen2_5_vl.model import Qwen2Decoder

LENGTHS, T, N = (5, 9, 2), 9, 12
NEVER = VOCAB + 7  # an id outside the vocabulary: never emitted


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  return tiny_qwen2_pair(str(tmp_path_factory.mktemp("gen")))


@pytest.fixture(scope="module")
def batch():
  ids, seg = left_padded_batch(LENGTHS, T, seed=0)
  return ids, seg


def _run(model, ids, seg, **kw):
  out = gen.generate(model, {"input_ids": ids, "segment_ids": seg}, **kw)
  return jax.tree.map(np.asarray, out)


def _eos_emitted_by_one_row(free_run: np.ndarray, step: int = 3) -> int:
  """A token row 0 emits first at `step` and some other row never emits (forces a per-row stop)."""
  tok = int(free_run[0, step])
  assert tok not in free_run[0, :step], "pick another step: the token occurs earlier in row 0"
  assert any(tok not in row for row in free_run[1:]), "pick another step: every row emits the token"
  return tok


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_greedy_matches_hf_generate_with_per_row_eos(pair, batch, pad_is_eos):
  """Left-padded batch of 3 prompt lengths: tokens, padding after EOS, counts equal HF's."""
  hf, model = pair
  ids, seg = batch
  free = _run(model, ids, seg, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=0).tokens
  np.testing.assert_array_equal(free, hf_greedy(hf, ids, seg, max_new_tokens=N, eos_token_id=NEVER,
                                                pad_token_id=0))
  eos = _eos_emitted_by_one_row(free)
  pad = eos if pad_is_eos else 0
  out = _run(model, ids, seg, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
  ref = hf_greedy(hf, ids, seg, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
  np.testing.assert_array_equal(out.tokens, ref)
  # Row 0 stops at step 3 (EOS counted), and at least one row runs to the limit.
  assert out.num_generated[0] == 4 and not out.hit_limit[0]
  assert np.all(out.tokens[0, 4:] == pad)
  assert out.hit_limit.any()
  for row in range(len(LENGTHS)):
    hits = np.flatnonzero(free[row] == eos)
    expected = hits[0] + 1 if hits.size else N
    assert out.num_generated[row] == expected
    assert out.hit_limit[row] == (hits.size == 0)


def test_eos_list_and_early_exit(pair, batch):
  """A list of EOS ids that every row emits: the loop stops before max_new_tokens."""
  hf, model = pair
  ids, seg = batch
  free = _run(model, ids, seg, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=0).tokens
  eos_ids = sorted({int(free[r, 2]) for r in range(len(LENGTHS))})  # every row stops by step 2
  out = _run(model, ids, seg, max_new_tokens=N, eos_token_id=eos_ids, pad_token_id=0)
  np.testing.assert_array_equal(out.tokens, hf_greedy(hf, ids, seg, max_new_tokens=N, eos_token_id=eos_ids,
                                                      pad_token_id=0))
  assert not out.hit_limit.any()
  assert out.num_generated.max() <= 3
  assert out.steps == out.num_generated.max() < N


def test_sampling_is_reproducible_per_key(pair, batch):
  """Same key -> same tokens; different key -> different tokens; top_k=1 / tiny top_p -> greedy."""
  _, model = pair
  ids, seg = batch
  kw = dict(max_new_tokens=N, eos_token_id=NEVER, pad_token_id=0, temperature=1.5)
  a = _run(model, ids, seg, rng=jax.random.key(1), **kw).tokens
  b = _run(model, ids, seg, rng=jax.random.key(1), **kw).tokens
  c = _run(model, ids, seg, rng=jax.random.key(2), **kw).tokens
  np.testing.assert_array_equal(a, b)
  assert (a != c).sum() >= 3
  greedy = _run(model, ids, seg, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=0).tokens
  assert (a != greedy).any()
  np.testing.assert_array_equal(_run(model, ids, seg, rng=jax.random.key(3), top_k=1, **kw).tokens, greedy)
  np.testing.assert_array_equal(_run(model, ids, seg, rng=jax.random.key(3), top_p=1e-6, **kw).tokens, greedy)
  with pytest.raises(ValueError, match="explicit rng"):
    gen.generate(model, {"input_ids": ids, "segment_ids": seg}, **kw)


def test_compiles_once_per_shape_not_per_step(batch):
  """One compile per (shapes, max_new_tokens), none on repeat or with new weights of the same shape."""
  ids, seg = batch
  inputs = {"input_ids": ids, "segment_ids": seg}
  compiles = []
  listener = lambda name, *_, **__: compiles.append(name) if name.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    model = Qwen2Decoder(qwen_config.tiny(), rngs=nnx.Rngs(0))
    kw = dict(eos_token_id=NEVER, pad_token_id=0)
    gen.generate(model, inputs, max_new_tokens=3, **kw)  # warm-up: also compiles eager helpers
    per_call = {}
    for max_new in (5, 20):
      before_cache, compiles[:] = gen.compile_count(), []
      out = gen.generate(model, inputs, max_new_tokens=max_new, **kw)
      assert int(out.steps) == max_new  # the EOS is never emitted, so every step runs
      per_call[max_new] = (len(compiles), gen.compile_count() - before_cache)
    assert per_call[5] == per_call[20] == (1, 1), per_call
    before_cache, compiles[:] = gen.compile_count(), []
    gen.generate(model, inputs, max_new_tokens=20, **kw)
    gen.generate(Qwen2Decoder(qwen_config.tiny(), rngs=nnx.Rngs(1)), inputs, max_new_tokens=20, **kw)
    assert (len(compiles), gen.compile_count() - before_cache) == (0, 0)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_input_validation(batch):
  """Bad arguments fail with clear messages."""
  ids, seg = batch
  model = Qwen2Decoder(qwen_config.tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=0, eos_token_id=1, pad_token_id=0)
  with pytest.raises(ValueError, match="segment_ids"):
    gen.generate(model, {"input_ids": ids}, max_new_tokens=2, eos_token_id=1, pad_token_id=0)
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=2, eos_token_id=1, pad_token_id=0,
                 temperature=1.0, top_p=0.0, rng=jax.random.key(0))
