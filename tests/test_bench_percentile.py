"""The benchmarks' percentile: numpy's linear rule, and infinite samples for what never
happened (benchmark 2 counts a BUY not placed as later than any placed, so a run that
dropped its latest BUYs gets no better p99 for it)."""

from __future__ import annotations

import math

from scripts.bench.harness import percentile


def test_linear_between_the_closest_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([float(n) for n in range(1, 10_001)], 99) == 9_900.01
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_a_few_unplaced_push_the_p99_up_but_leave_it_finite() -> None:
    placed = [float(ms) for ms in range(1, 9_951)]  # 50 of 10,000 not placed
    counted = percentile(placed + [math.inf] * 50, 99)
    assert math.isfinite(counted)
    assert counted > percentile(placed, 99)


def test_reaching_an_infinite_sample_gives_infinity_not_nan() -> None:
    placed = [float(ms) for ms in range(1, 9_901)]  # 100 of 10,000 not placed
    assert percentile(placed + [math.inf] * 100, 99) == math.inf  # between a placed and inf
    assert percentile(placed + [math.inf] * 200, 99) == math.inf  # between two infs
    assert 5_000.0 / percentile(placed + [math.inf] * 100, 99) == 0.0  # the arq ratio: a miss
    assert percentile([1.0, math.inf], 0) == 1.0
