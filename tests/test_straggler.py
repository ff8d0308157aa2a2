"""The straggler warning: a step 10x slower than the median of recent steps is logged with the host id."""

import logging

import pytest

from jaxdpo.train import loop as train


def _run(seconds, factor=10.0):
  durations = []
  for step, s in enumerate(seconds, start=1):
    train._straggler_check(durations, s, step, factor)
  return durations


def test_slow_step_warns_with_host_id(caplog):
  with caplog.at_level(logging.WARNING, logger="jaxdpo"):
    durations = _run([1.0, 1.1, 0.9, 1.0, 1.0, 10.5])
  msgs = [r.getMessage() for r in caplog.records]
  assert msgs == ["slow step 6 on host 0: 10.500s vs median 1.000s"]
  assert durations[-1] == 10.5  # the slow step still enters the history


@pytest.mark.parametrize("seconds", [
    [1.0, 1.0, 1.0, 1.0, 1.0, 9.9],    # below 10x the median
    [1.0, 1.0, 1.0, 50.0],             # fewer than 5 steps of history: no median yet
])
def test_no_warning(seconds, caplog):
  with caplog.at_level(logging.WARNING, logger="jaxdpo"):
    _run(seconds)
  assert not caplog.records


def test_median_is_robust_and_factor_configurable(caplog):
  # One earlier outlier does not move the median; a 3x factor catches a 4x step.
  with caplog.at_level(logging.WARNING, logger="jaxdpo"):
    _run([1.0, 30.0, 1.0, 1.0, 1.0, 1.0, 4.0], factor=3.0)
  assert [r.getMessage() for r in caplog.records] == ["slow step 7 on host 0: 4.000s vs median 1.000s"]
