"""Row refill (continuous batching) gives every prompt the greedy output static batching gives it.

Prompts of different lengths, fewer rows than prompts, EOS ids chosen so that rows finish at
different steps (a finished row is refilled while the others keep decoding). Qwen2 text, and the
two vision-language families with images (Qwen2.5-VL: M-RoPE positions per row; Gemma 3:
bidirectional image groups and a sliding window shorter than the run).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import _vision_job_helpers as VH
from _gen_helpers import left_padded_batch, tiny_qwen2_pair
from jaxdpo.data import pipeline, tokenize
from jaxdpo.generation import decode as gen
from jaxdpo.generation import sampling
from jaxdpo.jobs import common, defaults as config_defaults
from jaxdpo.jobs import evaluate

NEVER = 10_000  # an id outside every vocabulary here: never emitted


def _staggered_eos(free_run: np.ndarray) -> list[int]:
  """EOS ids that stop rows at >= 3 different lengths and leave at least one row at the limit."""
  n = free_run.shape[1]

  def lengths(eos):
    return [min(next((i for i, t in enumerate(row) if t in eos), n) + 1, n) for row in free_run]
  eos = []
  for col in range(1, n - 1):
    for tok in free_run[:, col]:
      trial = eos + [int(tok)]
      ls = lengths(trial)
      if ls.count(n) and len(set(ls)) > len(set(lengths(eos))):
        eos = trial
      if len(set(lengths(eos))) >= 3:
        return eos
  raise AssertionError("no EOS set staggers these rows; pick other prompts")


def _assert_same_per_prompt(static, refill):
  np.testing.assert_array_equal(refill.tokens, np.asarray(static.tokens))
  np.testing.assert_array_equal(refill.num_generated, np.asarray(static.num_generated))
  np.testing.assert_array_equal(refill.hit_limit, np.asarray(static.hit_limit))


def _check(model, make_inputs, num_prompts, prompt_length, max_new, batch_size, refill_rows):
  """Static batch of all prompts vs refill over `batch_size` rows; returns (refill output, EOS ids)."""
  everything = make_inputs(list(range(num_prompts)))
  free = jax.device_get(gen.generate(model, everything, max_new_tokens=max_new, eos_token_id=NEVER, pad_token_id=0))
  eos = _staggered_eos(np.asarray(free.tokens))
  static = jax.device_get(gen.generate(model, everything, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0))
  assert len(set(np.asarray(static.num_generated).tolist())) >= 3  # rows finish at different steps
  refill = gen.generate_refill(model, num_prompts, make_inputs, batch_size=batch_size, prompt_length=prompt_length,
                               max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0, refill_rows=refill_rows)
  _assert_same_per_prompt(static, refill)
  assert refill.stats["refills"] > num_prompts // refill_rows // 2  # rows really were refilled mid-run
  return refill, eos


def test_qwen2_text_refill_equals_static_and_compiles_a_fixed_set(tmp_path):
  model = tiny_qwen2_pair(str(tmp_path))[1]
  lengths, t, n = (3, 9, 5, 12, 1, 7, 4, 10, 6, 2, 11), 12, 16
  ids, seg = left_padded_batch(lengths, t, seed=1)
  make = lambda j: {"input_ids": ids[j], "segment_ids": seg[j]}
  eos = _check(model, make, len(lengths), t, n, batch_size=4, refill_rows=1)[1]
  before = gen.compile_count()
  # More prompts, another refill schedule: the same programs (shapes do not depend on the prompt count).
  more_ids, more_seg = left_padded_batch(lengths * 2, t, seed=2)
  gen.generate_refill(model, 2 * len(lengths), lambda j: {"input_ids": more_ids[j], "segment_ids": more_seg[j]},
                      batch_size=4, prompt_length=t, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                      refill_rows=1)
  assert gen.compile_count() == before


def test_negative_control_a_shared_cache_index_breaks_refill(tmp_path, monkeypatch):
  """If a refilled row did not restart its cache index (rows sharing one write slot, as before),
  its output would change: the exactness check above notices."""
  model = tiny_qwen2_pair(str(tmp_path))[1]
  lengths, t, n = (3, 9, 5, 12, 1, 7), 12, 16
  ids, seg = left_padded_batch(lengths, t, seed=1)
  make = lambda j: {"input_ids": ids[j], "segment_ids": seg[j]}
  real = type(model).set_cache_rows

  def keep_old_index(self, cache, rows, new):
    out = real(self, cache, rows, new)
    return dict(out, index=cache["index"])
  monkeypatch.setattr(type(model), "set_cache_rows", keep_old_index)
  with pytest.raises(AssertionError):
    _check(model, make, len(lengths), t, n, batch_size=2, refill_rows=1)


PRESETS = {"qwen2_5_vl": "tiny_vl", "gemma3": "tiny"}


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_vision_language_refill_equals_static_with_images(family, tmp_path):
  c = config_defaults.base()
  c.mesh.data = 1
  if family == "qwen2_5_vl":
    # A converted random HF model (init std 0.3): the preset's small init decodes one token forever.
    ck, _ = VH.build_checkpoint(family, str(tmp_path), seed=3, qwen_kw=dict(depth=2, fullatt=(1,)))
    c.model.checkpoint = ck
    tok_dir = f"{ck}/tokenizer"
  else:
    tok_dir = str(tmp_path / "tok")
    VH.gemma_processor_files(tok_dir)
    c.model.family, c.model.preset = family, PRESETS[family]
  c.data.tokenizer = tok_dir
  _, prompts, _ = VH.vision_records(str(tmp_path / "data"), n=6, seed=0)  # 0, 1 or 2 images per record
  tok = tokenize.load_tokenizer(tok_dir)
  vision = common.vision_adapter(c, tok)
  t = 64
  items = sampling.load_prompts(prompts, tok, sampling.PromptConfig(max_prompt_length=t), vision)
  items = items + items[::-1][:3]  # 9 prompts
  vision = vision.with_budget([seq for _, seq in items])
  _, model, _ = evaluate.load_generation_model(c)

  def make(job_ids):
    inputs = pipeline.collate_generation([items[j][1] for j in job_ids], length=t, pad_id=0, vision=vision)
    return vision.family.model_inputs(inputs, 1)
  assert len({len(seq.prompt) for _, seq in items}) >= 3  # prompts of different lengths
  _check(model, make, len(items), t, 14, batch_size=3, refill_rows=1)
