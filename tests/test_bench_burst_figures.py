"""Benchmark 2's figures do not improve by leaving out the BUYs the engine did not place."""

from __future__ import annotations

import math

from scripts.bench.harness import percentile
from scripts.bench.scheduled_burst import _p99_counting_unplaced


def test_with_every_buy_placed_it_is_the_plain_p99() -> None:
    lateness = [float(ms) for ms in range(1, 10_001)]
    assert _p99_counting_unplaced(lateness, 0) == percentile(lateness, 99)


def test_a_few_unplaced_buys_push_the_p99_up_but_leave_it_finite() -> None:
    lateness = [float(ms) for ms in range(1, 9_951)]  # 50 of 10,000 not placed
    placed_only = percentile(lateness, 99)
    counted = _p99_counting_unplaced(lateness, 50)
    assert math.isfinite(counted)
    assert counted > placed_only
    assert counted == percentile(lateness + [math.inf] * 50, 99)


def test_more_than_one_percent_unplaced_has_no_finite_p99() -> None:
    lateness = [float(ms) for ms in range(1, 9_901)]  # 100 of 10,000 not placed
    assert _p99_counting_unplaced(lateness, 100) == math.inf
    assert 5_000.0 / _p99_counting_unplaced(lateness, 100) == 0.0  # the arq ratio: a miss
