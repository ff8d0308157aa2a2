"""Detects text degeneration: generations that fall into an exact repetition loop.

Definition (after the DharmaOCR study): a generation is *degenerate* when
  1. it hit the max-new-token limit (no EOS), AND
  2. its tail is an exact n-gram loop: some unit of `period` tokens repeats back to back, at
     least `min_repeats` full times, up to the very last token (the limit may cut the last copy
     short), and the loop covers at least `min_tail_coverage` of the tail window.

A loop that satisfies 2. but whose generation ended with EOS before the limit is an
*early loop*: the model looped and then recovered. It is counted separately and is not
degenerate.

Design choices (all knobs live in `DegenerationConfig`):
  * Exact repetition only. "item 1, item 2, item 3, ..." or a table whose rows share a layout
    but differ in content is NOT a loop: those are how legitimate documents look, and
    counters cannot be told apart from real enumerations by token identity. The price is that
    a loop whose copies drift (a counter that keeps counting) is not caught.
  * Only the tail matters. The loop must reach the end of the output: degeneration is a state
    the model never leaves, which is why it runs into the limit.
  * The coverage threshold is relative to the tail window (or the whole output when it is
    shorter), so a short legitimate run ("....." in a table of contents, "| --- | --- |") at
    the end of a long, truncated transcription is not a loop.
  * Among qualifying periods the one whose loop covers the most tokens wins; ties go to the
    smallest period (so "a b a b ..." reports period 2, not 4).

Inputs are token ids. `detect_text` offers the same test on text split into words or chars.
Callers pass the generated tokens only: no prompt, no padding, and no trailing EOS
(`detect_generation` does the stripping for a `jaxdpo.generation.decode.GenerationOutput`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxdpo.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DegenerationConfig:
  """Thresholds of the loop detector.

  Attributes:
    min_period: shortest repeated unit, in tokens.
    max_period: longest repeated unit, in tokens. Longer units (a whole repeated paragraph)
      are not searched; with the defaults any unit up to 64 tokens that repeats 3 times fits
      in the tail window.
    min_repeats: full back-to-back copies of the unit required.
    tail_window: how many final tokens form the tail.
    min_tail_coverage: share of the tail window (or of the output, if shorter) that the loop
      must cover, in (0, 1].
  """

  min_period: int = 1
  max_period: int = 64
  min_repeats: int = 3
  tail_window: int = 256
  min_tail_coverage: float = 0.5

  def __post_init__(self):
    if not 1 <= self.min_period <= self.max_period:
      raise ConfigError(f"degeneration: need 1 <= min_period <= max_period, got {self.min_period}, {self.max_period}")
    if self.min_repeats < 2:
      raise ConfigError(f"degeneration.min_repeats must be >= 2, got {self.min_repeats}")
    if self.tail_window < 1:
      raise ConfigError(f"degeneration.tail_window must be >= 1, got {self.tail_window}")
    if not 0.0 < self.min_tail_coverage <= 1.0:
      raise ConfigError(f"degeneration.min_tail_coverage must be in (0, 1], got {self.min_tail_coverage}")


# Scaled for character units: a repeated line of ~40 words is a few hundred characters.
CHAR_CONFIG = DegenerationConfig(max_period=256, tail_window=1024)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The detector's finding for one generation.

  Attributes:
    is_degenerate: hit the limit and the tail loops.
    is_early_loop: the tail loops but the generation ended with EOS before the limit.
    period: length of the repeated unit in tokens; 0 when there is no loop.
    repeats: full copies of the unit in the loop; 0 when there is no loop.
    loop_start: index of the loop's first token in the output; -1 when there is no loop.
    num_tokens: length of the inspected output.
    hit_limit: as given.
  """

  is_degenerate: bool
  is_early_loop: bool
  period: int
  repeats: int
  loop_start: int
  num_tokens: int
  hit_limit: bool

  @property
  def loops(self) -> bool:
    return self.period > 0


def _trailing_run(tokens: np.ndarray, period: int) -> int:
  """Length of the longest suffix that is `period`-periodic (at least `period` tokens)."""
  same = tokens[period:] == tokens[:-period]
  breaks = np.flatnonzero(~same)
  matched = same.size - (breaks[-1] + 1) if breaks.size else same.size
  return matched + period


def detect(tokens: Sequence[int] | np.ndarray, hit_limit: bool,
           cfg: DegenerationConfig = DegenerationConfig()) -> Verdict:
  """Classifies one generation.

  Args:
    tokens: the generated token ids (no prompt, padding or trailing EOS).
    hit_limit: whether the generation ran into max_new_tokens without EOS.
    cfg: thresholds.

  Returns:
    A `Verdict`. Empty or very short outputs never loop.
  """
  x = np.asarray(tokens).reshape(-1)
  n = x.size
  window = min(cfg.tail_window, n)
  best_len, best_period = 0, 0
  for period in range(cfg.min_period, min(cfg.max_period, n // cfg.min_repeats) + 1):
    run = _trailing_run(x, period)
    if run // period < cfg.min_repeats or min(run, window) < cfg.min_tail_coverage * window:
      continue
    if run > best_len:  # strict: ties keep the smaller period
      best_len, best_period = run, period
  if best_period == 0:
    return Verdict(False, False, 0, 0, -1, n, bool(hit_limit))
  return Verdict(is_degenerate=bool(hit_limit), is_early_loop=not hit_limit, period=best_period,
                 repeats=best_len // best_period, loop_start=n - best_len, num_tokens=n, hit_limit=bool(hit_limit))


def detect_text(text: str, hit_limit: bool, cfg: DegenerationConfig | None = None, *,
                unit: str = "word") -> Verdict:
  """`detect` on text: `unit="word"` splits on whitespace, `unit="char"` uses characters.

  Periods, repeats and `loop_start` are then counted in words or characters. The default
  config is `DegenerationConfig()` for words and `CHAR_CONFIG` for characters.
  """
  if unit == "word":
    pieces = text.split()
  elif unit == "char":
    pieces = list(text)
  else:
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
  if cfg is None:
    cfg = CHAR_CONFIG if unit == "char" else DegenerationConfig()
  vocab: dict[str, int] = {}
  ids = np.array([vocab.setdefault(p, len(vocab)) for p in pieces], np.int64)
  return detect(ids, hit_limit, cfg)


def detect_generation(tokens_BN, num_generated_B, hit_limit_B,
                      cfg: DegenerationConfig = DegenerationConfig()) -> list[Verdict]:
  """Verdicts for a batch from `jaxdpo.generation.decode.generate`.

  Each row is cut to its `num_generated` tokens; rows that stopped (not `hit_limit`) end
  with their EOS, which `generate` counts, so that last token is dropped.
  """
  tokens_BN = np.asarray(tokens_BN)
  num_B = np.asarray(num_generated_B)
  hit_B = np.asarray(hit_limit_B)
  verdicts = []
  for row, n, hit in zip(tokens_BN, num_B, hit_B):
    end = int(n) if hit else max(int(n) - 1, 0)
    verdicts.append(detect(row[:end], bool(hit), cfg))
  return verdicts


def rates(verdicts: Iterable[Verdict]) -> dict:
  """Counts and rates over a set of verdicts.

  Returns:
    {"n", "degenerate", "early_loop", "hit_limit", "degeneration_rate", "early_loop_rate",
     "hit_limit_rate"}; the rates are None when n == 0.
  """
  verdicts = list(verdicts)
  n = len(verdicts)
  counts = {
      "degenerate": sum(v.is_degenerate for v in verdicts),
      "early_loop": sum(v.is_early_loop for v in verdicts),
      "hit_limit": sum(v.hit_limit for v in verdicts),
  }
  out = {"n": n, **counts}
  out.update({
      "degeneration_rate": counts["degenerate"] / n if n else None,
      "early_loop_rate": counts["early_loop"] / n if n else None,
      "hit_limit_rate": counts["hit_limit"] / n if n else None,
  })
  return out


# ------------------------------------------------------------------------------------------------
# The same detector inside the decode loop (`generate.stop_on_loop`), one token at a time.
#
# For each period p in [min_period, max_period] a row keeps `matches[p]`: how many of its last
# tokens x[i] equal x[i - p], back to back up to the newest token. That is `_trailing_run(x, p) - p`
# kept up to date in O(max_period) per token, so `loops_now` answers `detect(x).loops` for the
# row's output so far without rereading it. The coverage test compares integers: `need[w]` is the
# least number of tokens the offline detector accepts for a window of w tokens (the same float
# comparison, done on the host), so the two cannot disagree by rounding.


def coverage_need(cfg: DegenerationConfig) -> np.ndarray:
  """int32 [tail_window + 1]: need[w] = least m with `not (m < min_tail_coverage * w)`."""
  return np.array([_least_covering(cfg.min_tail_coverage, w) for w in range(cfg.tail_window + 1)], np.int32)


def _least_covering(coverage: float, w: int) -> int:
  m = max(int(np.floor(coverage * w)) - 1, 0)
  while m < coverage * w:  # the offline test, `min(run, window) < coverage * window`, in float64
    m += 1
  return m


def default_min_run(cfg: DegenerationConfig, max_new_tokens: int) -> int:
  """`generate.stop_on_loop_min_run`'s default: two whole tail windows, 2 * min(tail_window, max_new_tokens).

  Why two windows. One window's coverage (`coverage_need`, the full-length test) is too eager:
  a model that loops for a while and then ends with EOS (the study's early loop), or a page whose
  lines really repeat, covers it and would be cut although it is clean at full length (measured:
  agreement 0.70 on the bench workload, 0.86 on the converged demo reader). A loop that fills two
  consecutive windows is one the full-length test would call degenerate on each of them alone, and
  the window is the scale the user already chose to judge degeneration at, so the default follows
  it rather than any one data set. When twice the window is not below `max_new_tokens`, nothing is
  ever cut (every record keeps the full-length definition); set the key lower to trade agreement for
  speed.
  """
  return 2 * min(cfg.tail_window, max_new_tokens)


def confirm_run(cfg: DegenerationConfig, max_new_tokens: int, min_run: int | None = None) -> int:
  """Loop length (tokens) at which decoding stops a looping row (`generate.stop_on_loop`).

  A loop confirmed early must be one that makes the row degenerate by the full-length definition
  if it goes on to the limit: there the window is min(tail_window, max_new_tokens) tokens, and
  the loop has to cover `coverage_need` of it. On top of that the loop must cover `min_run`
  tokens (`generate.stop_on_loop_min_run`; None = `default_min_run`), so that loops a model leaves
  again, and content that legitimately repeats, keep decoding.

  Args:
    cfg: the detector's thresholds.
    max_new_tokens: the generation limit.
    min_run: tokens the loop must cover before the cut (>= 1), or None for the default.

  Returns:
    The confirm length; a row is only ever cut before the limit, so a value >= max_new_tokens
    never cuts.
  """
  if min_run is None:
    min_run = default_min_run(cfg, max_new_tokens)
  if min_run < 1:
    raise ConfigError(f"generate.stop_on_loop_min_run must be >= 1 (or 0 for the default), got {min_run}")
  return max(int(coverage_need(cfg)[min(cfg.tail_window, max_new_tokens)]), int(min_run))


def loop_periods(cfg: DegenerationConfig) -> np.ndarray:
  """int32 [P]: the periods the detector searches, min_period..max_period."""
  return np.arange(cfg.min_period, cfg.max_period + 1, dtype=np.int32)


def track_token(matches_BP, tokens_BN, new_B, pos_B, active_B, periods_P):
  """Updates the trailing-match counts after row b appended `new_B[b]` at position `pos_B[b]`.

  Args:
    matches_BP: int32 [B, P] counts before the token.
    tokens_BN: int [B, N] the rows' outputs; positions < pos_B[b] must hold row b's tokens.
    new_B: int [B] the appended tokens.
    pos_B: int [B] their positions (0-based) in the output.
    active_B: bool [B]; inactive rows keep their counts.
    periods_P: int32 [P] from `loop_periods`.

  Returns:
    int32 [B, P] counts after the token.
  """
  back_BP = pos_B[:, None] - periods_P[None, :]
  earlier_BP = jnp.take_along_axis(tokens_BN, jnp.clip(back_BP, 0, tokens_BN.shape[1] - 1), axis=1)
  same_BP = (back_BP >= 0) & (earlier_BP == new_B[:, None])
  return jnp.where(active_B[:, None], jnp.where(same_BP, matches_BP + 1, 0), matches_BP)


def loops_now(matches_BP, n_B, periods_P, need_W, cfg: DegenerationConfig):
  """`detect(output[:n]).loops` and `.period` of each row, from `track_token`'s counts.

  Args:
    matches_BP: int32 [B, P].
    n_B: int [B] tokens in each row's output so far.
    periods_P: int32 [P] from `loop_periods`.
    need_W: int32 [tail_window + 1] from `coverage_need`.
    cfg: the thresholds (min_repeats, tail_window).

  Returns:
    (loops bool [B], period int32 [B] (0 = none), run int32 [B]: tokens the chosen loop covers).
  """
  run_BP = matches_BP + periods_P[None, :]
  window_B = jnp.minimum(cfg.tail_window, n_B)
  ok_BP = ((periods_P[None, :] * cfg.min_repeats <= n_B[:, None])       # p <= n // min_repeats
           & (run_BP // periods_P[None, :] >= cfg.min_repeats)
           & (jnp.minimum(run_BP, window_B[:, None]) >= need_W[window_B][:, None]))
  score_BP = jnp.where(ok_BP, run_BP, 0)
  best_B = jnp.argmax(score_BP, axis=1)  # first maximum: ties keep the smaller period, as `detect` does
  loops_B = jnp.any(ok_BP, axis=1)
  period_B = jnp.where(loops_B, periods_P[best_B], 0)
  run_B = jnp.where(loops_B, jnp.take_along_axis(run_BP, best_B[:, None], axis=1)[:, 0], 0)
  return loops_B, period_B, run_B
