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
# loop are cut at `degeneration.confirm_run` tokens of loop, the others run as before.

LOOP_CFG = deg.DegenerationConfig(min_period=1, max_period=6, min_repeats=3, tail_window=12, min_tail_coverage=0.5)
LENGTHS, T, N = (3, 9, 5, 12, 1, 7, 4, 10), 12, 40


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return tiny_qwen2_pair(str(tmp_path_factory.mktemp("loop")))[1]


@pytest.fixture(scope="module")
def full_length(model):
  ids, seg = left_padded_batch(LENGTHS, T, seed=4)
  out = gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=N, eos_token_id=NEVER,
                     pad_token_id=0)
  return ids, seg, jax.tree.map(np.asarray, out)


def _check_cut_rows(full, tokens, num, cut, hit):
  """Uncut rows equal the full-length run; cut rows are prefixes of it, end in a confirmed loop,
  and that loop is still there at the limit (so the full-length verdict is degenerate too)."""
  confirm = deg.confirm_run(LOOP_CFG, N)
  assert cut.any() and not cut.all(), cut  # the model has both kinds of rows
  for r in range(len(cut)):
    if not cut[r]:
      np.testing.assert_array_equal(tokens[r], full.tokens[r])
      assert num[r] == full.num_generated[r] and hit[r] == full.hit_limit[r]
      continue
    n = int(num[r])
    assert n < N and not hit[r]
    np.testing.assert_array_equal(tokens[r, :n], full.tokens[r, :n])
    assert (tokens[r, n:] == 0).all()
    v = deg.detect(tokens[r, :n], True, LOOP_CFG)
    assert v.loops and n - v.loop_start >= confirm
    assert not deg.detect(tokens[r, :n - 1], True, LOOP_CFG).loops or \
        (n - 1) - deg.detect(tokens[r, :n - 1], True, LOOP_CFG).loop_start < confirm  # cut at the first chance
    assert deg.detect(full.tokens[r], True, LOOP_CFG).is_degenerate


def test_static_batch_cuts_looping_rows_only(model, full_length):
  ids, seg, full = full_length
  out = jax.tree.map(np.asarray, gen.generate(model, {"input_ids": ids, "segment_ids": seg}, max_new_tokens=N,
                                              eos_token_id=NEVER, pad_token_id=0, stop_on_loop=LOOP_CFG))
  assert not full.stopped_on_loop.any()
  _check_cut_rows(full, out.tokens, out.num_generated, out.stopped_on_loop, out.hit_limit)


def test_refill_cuts_looping_rows_only(model, full_length):
  ids, seg, full = full_length
  out = gen.generate_refill(model, len(LENGTHS), lambda j: {"input_ids": ids[j], "segment_ids": seg[j]},
                            batch_size=3, prompt_length=T, max_new_tokens=N, eos_token_id=NEVER, pad_token_id=0,
                            stop_on_loop=LOOP_CFG, refill_rows=1)
  _check_cut_rows(full, out.tokens, out.num_generated, out.stopped_on_loop, out.hit_limit)
