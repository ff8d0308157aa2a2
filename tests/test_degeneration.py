"""Loop detector: each test name states the expected verdict."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdpo.generation import degeneration as deg

CFG = deg.DegenerationConfig()


def _random_tokens(n: int, seed: int) -> np.ndarray:
  """Non-repeating filler: distinct ids, so no accidental loops."""
  return np.random.RandomState(seed).permutation(50_000)[:n] + 1_000


def _looping_output(period: int, prefix: int = 60, total: int = 301, seed: int = 0) -> np.ndarray:
  """`prefix` tokens of ordinary text, then one `period`-token phrase until `total` tokens."""
  unit = np.arange(period) + 100  # distinct ids: the unit is not itself periodic
  reps = -(-(total - prefix) // period)
  return np.concatenate([_random_tokens(prefix, seed), np.tile(unit, reps)])[:total]


@pytest.mark.parametrize("period", [1, 3, 12])
def test_exact_loop_at_limit_is_degenerate(period):
  """A 1/3/12-token phrase repeated into the limit (last copy cut short): degenerate."""
  tokens = _looping_output(period)
  v = deg.detect(tokens, hit_limit=True, cfg=CFG)
  assert v.is_degenerate and not v.is_early_loop
  assert v.period == period
  assert v.loop_start == 60
  assert v.repeats == (301 - 60) // period
  assert v.num_tokens == 301


@pytest.mark.parametrize("period", [1, 3, 12])
def test_exact_loop_that_ended_with_eos_is_early_loop(period):
  """The same loop, but the model emitted EOS before the limit: early_loop, not degenerate."""
  v = deg.detect(_looping_output(period), hit_limit=False, cfg=CFG)
  assert v.is_early_loop and not v.is_degenerate
  assert v.period == period


def test_varying_counter_is_not_degenerate():
  """'item 1, item 2, item 3, ...' into the limit: NOT degenerate (exact repetition required)."""
  text = " ".join(f"item {i}," for i in range(1, 200))
  for unit in ("word", "char"):
    v = deg.detect_text(text, hit_limit=True, unit=unit)
    assert not v.is_degenerate and v.period == 0, (unit, v)
  item, comma = 7, 8
  ids = np.array([t for i in range(100) for t in (item, 1_000 + i, comma)])
  assert not deg.detect(ids, hit_limit=True).is_degenerate


def test_repetitive_table_with_different_cells_is_not_degenerate():
  """Markdown rows '| name | value |' with different contents, truncated: NOT degenerate."""
  rng = np.random.RandomState(0)
  names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
  rows = ["| Name | Value |", "| --- | --- |"]
  rows += [f"| {names[rng.randint(len(names))]} | {rng.randint(10_000)} |" for _ in range(120)]
  text = "\n".join(rows)
  for unit in ("word", "char"):
    v = deg.detect_text(text, hit_limit=True, unit=unit)
    assert not v.is_degenerate and v.period == 0, (unit, v)


def test_repeated_header_with_different_content_is_not_degenerate():
  """'Invoice no. N / Total: X' blocks repeated with different values: NOT degenerate."""
  text = "\n".join(f"Invoice no. {1000 + 7 * i}\nTotal: {i * 13 % 97}.00 BRL" for i in range(80))
  for unit in ("word", "char"):
    assert not deg.detect_text(text, hit_limit=True, unit=unit).is_degenerate, unit


def test_truncated_text_without_loop_is_not_degenerate():
  """Hit the limit in ordinary text (no loop): NOT degenerate, no loop reported."""
  v = deg.detect(_random_tokens(400, seed=1), hit_limit=True)
  assert (v.is_degenerate, v.is_early_loop, v.period, v.repeats, v.loop_start) == (False, False, 0, 0, -1)


def test_short_repeated_run_at_end_of_long_text_is_not_degenerate():
  """A 20-token run of dots ending a long truncated transcription: below coverage, NOT degenerate."""
  tokens = np.concatenate([_random_tokens(280, seed=2), np.full(20, 5)])
  assert not deg.detect(tokens, hit_limit=True).is_degenerate
  # ...but the same run in a 30-token output covers the tail: degenerate.
  tokens = np.concatenate([_random_tokens(10, seed=2), np.full(20, 5)])
  v = deg.detect(tokens, hit_limit=True)
  assert v.is_degenerate and v.period == 1 and v.loop_start == 10


def test_two_copies_are_not_a_loop():
  """A 64-token paragraph written twice (below min_repeats=3): NOT degenerate."""
  unit = _random_tokens(64, seed=3)
  assert not deg.detect(np.concatenate([unit, unit]), hit_limit=True).is_degenerate
  assert deg.detect(np.concatenate([unit, unit, unit]), hit_limit=True).is_degenerate


def test_loop_followed_by_other_text_is_not_early_loop():
  """A loop the model left before EOS (closing text after it): no loop in the tail."""
  tokens = np.concatenate([_looping_output(3, total=200), _random_tokens(150, seed=4)])
  v = deg.detect(tokens, hit_limit=False)
  assert not v.is_early_loop and v.period == 0


@pytest.mark.parametrize("hit_limit", [True, False])
def test_empty_output_is_not_degenerate(hit_limit):
  """Empty output: NOT degenerate, NOT early loop, no crash."""
  v = deg.detect([], hit_limit=hit_limit)
  assert (v.is_degenerate, v.is_early_loop, v.period, v.num_tokens) == (False, False, 0, 0)
  assert not deg.detect_text("", hit_limit=hit_limit).is_degenerate


def test_word_level_sentence_loop_is_degenerate():
  """A 6-word sentence repeated into the limit, as text: degenerate with period 6."""
  v = deg.detect_text("Recibo de pagamento. " + "the cat sat on the mat. " * 60, hit_limit=True)
  assert v.is_degenerate and v.period == 6 and v.loop_start == 3


def test_detect_generation_strips_eos_and_rates_count():
  """Rows of a GenerationOutput: EOS dropped before detection; rates over 4 rows."""
  eos, pad, n = 2, 0, 40
  loop = np.tile([11, 12, 13], 20)[:n]
  rows = np.full((4, n), pad)
  rows[0] = loop                                   # loops into the limit -> degenerate
  rows[1, :31] = np.r_[loop[:30], eos]             # loops, then EOS -> early loop
  rows[2] = _random_tokens(n, seed=5)              # truncated, no loop -> clean
  rows[3, :6] = np.r_[_random_tokens(5, 6), eos]   # short, ended -> clean
  verdicts = deg.detect_generation(rows, [40, 31, 40, 6], [True, False, True, False])
  assert [(v.is_degenerate, v.is_early_loop) for v in verdicts] == [
      (True, False), (False, True), (False, False), (False, False)]
  assert verdicts[1].num_tokens == 30  # the EOS is not part of the inspected output
  r = deg.rates(verdicts)
  assert r == {"n": 4, "degenerate": 1, "early_loop": 1, "hit_limit": 2, "degeneration_rate": 0.25,
               "early_loop_rate": 0.25, "hit_limit_rate": 0.5}
  assert deg.rates([])["degeneration_rate"] is None


def test_config_validation():
  """Nonsensical thresholds are rejected with a message naming the field."""
  with pytest.raises(ValueError, match="min_repeats"):
    deg.DegenerationConfig(min_repeats=1)
  with pytest.raises(ValueError, match="min_tail_coverage"):
    deg.DegenerationConfig(min_tail_coverage=0.0)
  with pytest.raises(ValueError, match="max_period"):
    deg.DegenerationConfig(min_period=5, max_period=4)
