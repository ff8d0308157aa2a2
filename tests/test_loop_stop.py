"""`generate.stop_on_loop`: the in-loop loop detector equals the offline one, and cutting looping
rows short changes nothing else (static batches and row refill)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _gen_helpers import left_padded_batch, tiny_qwen2_pair
from jaxdpo.generation import decode as gen
from jaxdpo.errors import ConfigError
from jaxdpo.generation import degeneration as deg

NEVER = 10_000  # an id outside the vocabulary: never emitted


@functools.partial(jax.jit, static_argnames=("cfg",))
def _in_loop_verdicts(tokens_BN, cfg):
  """Feeds each row to the in-loop detector one token at a time: (loops [B, N], period [B, N]) after
  every prefix length 1..N."""
  b, n = tokens_BN.shape
  periods, need = jnp.asarray(deg.loop_periods(cfg)), jnp.asarray(deg.coverage_need(cfg))

  def step(matches, i):
    matches = deg.track_token(matches, tokens_BN, tokens_BN[:, i], jnp.full((b,), i), jnp.ones((b,), bool), periods)
    loops, period, _ = deg.loops_now(matches, jnp.full((b,), i + 1), periods, need, cfg)
    return matches, (loops, period)

  _, (loops, period) = jax.lax.scan(step, jnp.zeros((b, periods.shape[0]), jnp.int32), jnp.arange(n))
  return loops.T, period.T


def _sequences(rng, b: int, n: int) -> np.ndarray:
  """Random token rows: noise, exact loops of random period starting anywhere, near-loops (one
  token changed), over small vocabularies so that chance repeats are common."""
  out = np.zeros((b, n), np.int32)
  for r in range(b):
    vocab = rng.randint(2, 6)
    row = rng.randint(0, vocab, n)
    kind = r % 3
    if kind:
      start, period = rng.randint(0, n), rng.randint(1, 9)
      unit = rng.randint(0, vocab, period)
      row[start:] = np.resize(unit, n - start)
      if kind == 2 and n - start > 2:
        row[rng.randint(start, n)] = vocab  # break the loop once
    out[r] = row
  return out


CONFIGS = [deg.DegenerationConfig(min_period=1, max_period=8, min_repeats=3, tail_window=16, min_tail_coverage=0.5),
           deg.DegenerationConfig(min_period=2, max_period=5, min_repeats=2, tail_window=7, min_tail_coverage=0.3),
           deg.DegenerationConfig(min_period=1, max_period=12, min_repeats=4, tail_window=40, min_tail_coverage=0.9)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_in_loop_detector_equals_offline_on_every_prefix(cfg):
  rng = np.random.RandomState(CONFIGS.index(cfg))
  x = _sequences(rng, 60, 48)
  loops, period = map(np.asarray, _in_loop_verdicts(jnp.asarray(x), cfg))
  offline = [[deg.detect(row[:k], True, cfg) for k in range(1, x.shape[1] + 1)] for row in x]
  want_loops = np.array([[v.loops for v in row] for row in offline])
  want_period = np.array([[v.period for v in row] for row in offline])
  assert want_loops.any() and not want_loops.all()  # both outcomes occur, so agreement means something
  np.testing.assert_array_equal(loops, want_loops)
  np.testing.assert_array_equal(period, want_period)


def test_negative_control_a_different_threshold_disagrees():
  """The comparison above catches a detector that is off by one repeat."""
  cfg = CONFIGS[0]
  x = _sequences(np.random.RandomState(0), 60, 48)
  loops, _ = _in_loop_verdicts(jnp.asarray(x), deg.DegenerationConfig(**{**cfg.__dict__, "min_repeats": 4}))
  want = np.array([[deg.detect(row[:k], True, cfg).loops for k in range(1, x.shape[1] + 1)] for row in x])
  assert (np.asarray(loops) != want).any()


def test_coverage_need_matches_the_float_test():
  for cov in (0.5, 0.3, 0.9, 1.0, 0.1, 1 / 3, 0.7):
    cfg = deg.DegenerationConfig(tail_window=300, min_tail_coverage=cov)
    need = deg.coverage_need(cfg)
    for w in range(301):
      assert not need[w] < cov * w and (need[w] == 0 or need[w] - 1 < cov * w), (cov, w, need[w])


# ----------------------------------------------------------------------------------------------
# In the decode loop. A tiny random Qwen2 falls into loops within a few greedy tokens; rows that
# loop are cut once the loop covers `degeneration.confirm_run` tokens (`stop_min_run`), the
# others run as before.

LOOP_CFG = deg.DegenerationConfig(min_period=1, max_period=6, min_repeats=3, tail_window=12, min_tail_coverage=0.5)
LENGTHS, T, N = (3, 9, 5, 12, 1, 7, 4, 10), 12, 40
# None = the default (two tail windows: 24 tokens here); 9 = a short confirm length, above the
# coverage need (6) so that the key, not the coverage, decides. The prompts (two seeds' batches) hold a
# row that both cut, one that only 9 cuts, and rows neither cuts.
MIN_RUNS = (None, 9)
PROMPT_SEEDS = (3, 6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return tiny_qwen2_pair(str(tmp_path_factory.mktemp("loop")))[1]


@pytest.fixture(scope="module")
def full_length(model):
  batches = [left_padded_batch(LENGTHS, T, seed=s) for s in PROMPT_SEEDS]
  ids, seg = (np.concatenate([b[i] for b in batches]) for i in (0, 1))
  out = gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=N, eos_token_id=NEVER,
                     pad_token_id=0)
  return ids, seg, jax.tree.map(np.asarray, out)


def _rule_allows(tokens, confirm: int) -> bool:
  """The stopping rule on an output so far: its tail is a loop covering `confirm` tokens, before the limit."""
  v = deg.detect(tokens, True, LOOP_CFG)
  return len(tokens) < N and v.loops and len(tokens) - v.loop_start >= confirm


def _check_cut_rows(full, tokens, num, cut, hit, min_run):
  """Uncut rows equal the full-length run and never met the rule; cut rows are prefixes of it, cut
  at the first prefix that meets the rule. (Whether the loop lasts to the limit is not a property of
  the rule: a model may leave it; the bench and the demo measure how often.)"""
  confirm = deg.confirm_run(LOOP_CFG, N, min_run)
  assert confirm == (2 * LOOP_CFG.tail_window if min_run is None else min_run)
  assert cut.any() and not cut.all(), cut  # the model has both kinds of rows
  for r in range(len(cut)):
    n = int(num[r]) if cut[r] else N
    first = next((k for k in range(1, N + 1) if _rule_allows(full.tokens[r, :k], confirm)), None)
    assert first == (n if cut[r] else None), (r, first, n)  # cut exactly at the first point the rule allows
    if not cut[r]:
      np.testing.assert_array_equal(tokens[r], full.tokens[r])
      assert num[r] == full.num_generated[r] and hit[r] == full.hit_limit[r]
      continue
    assert n < N and not hit[r]
    np.testing.assert_array_equal(tokens[r, :n], full.tokens[r, :n])
    assert (tokens[r, n:] == 0).all()


@pytest.mark.parametrize("min_run", MIN_RUNS)
def test_static_batch_cuts_looping_rows_only(model, full_length, min_run):
  ids, seg, full = full_length
  out = jax.tree.map(np.asarray, gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=N,
                                              eos_token_id=NEVER, pad_token_id=0, stop_on_loop=LOOP_CFG,
                                              stop_min_run=min_run))
  assert not full.stopped_on_loop.any()
  _check_cut_rows(full, out.tokens, out.num_generated, out.stopped_on_loop, out.hit_limit, min_run)


@pytest.mark.parametrize("min_run", MIN_RUNS)
def test_refill_cuts_looping_rows_only(model, full_length, min_run):
  ids, seg, full = full_length
  out = gen.generate_refill(model, len(ids), lambda j: {"input_ids": ids[j], "segment_ids": seg[j]},
                            batch_size=3, prompt_length=T, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=0,
                            stop_on_loop=LOOP_CFG, stop_min_run=min_run, refill_rows=1)
  _check_cut_rows(full, out.tokens, out.num_generated, out.stopped_on_loop, out.hit_limit, min_run)


def test_min_run_at_the_limit_cuts_nothing(model, full_length):
  """A confirm length that is not below max_new_tokens leaves the full-length run as it is."""
  ids, seg, full = full_length
  out = jax.tree.map(np.asarray, gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=N,
                                              eos_token_id=NEVER, pad_token_id=0, stop_on_loop=LOOP_CFG,
                                              stop_min_run=N))
  assert not out.stopped_on_loop.any()
  np.testing.assert_array_equal(out.tokens, full.tokens)


def test_confirm_run_follows_the_key():
  assert deg.default_min_run(LOOP_CFG, N) == 24 and deg.default_min_run(LOOP_CFG, 10) == 20
  assert deg.confirm_run(LOOP_CFG, N, 2) == 6  # never below the full-length coverage of the window
  assert deg.confirm_run(LOOP_CFG, N, 30) == 30
  with pytest.raises(ConfigError, match="generate.stop_on_loop_min_run"):
    deg.confirm_run(LOOP_CFG, N, 0)


def test_stop_on_loop_min_run_key_is_validated(caplog):
  from jaxdpo.jobs import common, defaults
  c = defaults.base()
  c.generate.stop_on_loop = True
  c.generate.max_new_tokens = 64
  c.degeneration.tail_window = 16
  assert common.decoding_options(c).stop_min_run is None  # 0 = the default rule
  c.generate.stop_on_loop_min_run = 40
  assert common.decoding_options(c).stop_min_run == 40
  for bad in (-1, -64):  # (the ConfigDict refuses non-ints itself)
    c.generate.stop_on_loop_min_run = bad
    with pytest.raises(ConfigError, match="generate.stop_on_loop_min_run"):
      common.decoding_options(c)
  c.generate.stop_on_loop_min_run = 64
  with caplog.at_level("WARNING", logger="jaxdpo"):
    common.decoding_options(c)
  assert "no row will be cut short" in caplog.text
