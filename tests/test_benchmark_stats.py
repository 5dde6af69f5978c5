"""The statistics ``benchmarks/moments_overhead.py`` reports its ratios with."""

from __future__ import annotations

import random
import statistics

import pytest
from _benchmarks import load_benchmark

overhead = load_benchmark("moments_overhead")


def test_ratio_with_error_by_hand() -> None:
    assert overhead.ratio_with_error([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx((2.0, 0.0))
    # ratio 3; residuals -1 and 1, their sd sqrt(2), over sqrt(2) rounds and the reference's mean 1
    assert overhead.ratio_with_error([2.0, 4.0], [1.0, 1.0]) == pytest.approx((3.0, 1.0))


def test_ratio_standard_error_matches_the_spread_of_repeated_runs() -> None:
    """Runs whose rounds share a drift and add their own noise: the ratios' spread over 400
    repeated runs is what one run's standard error claims (the drift cancels in the pairing)."""
    rng = random.Random(0)
    ratios, errors = [], []
    for _ in range(400):
        drift = [1 + 0.3 * rng.random() for _ in range(60)]
        reference = [d * (1 + rng.gauss(0, 0.05)) for d in drift]
        probed = [1.03 * d * (1 + rng.gauss(0, 0.08)) for d in drift]
        ratio, error = overhead.ratio_with_error(probed, reference)
        ratios.append(ratio)
        errors.append(error)
    assert statistics.fmean(ratios) == pytest.approx(1.03, abs=0.002)
    assert statistics.fmean(errors) == pytest.approx(statistics.stdev(ratios), rel=0.15)
    assert statistics.stdev(ratios) == pytest.approx(1.03 * (0.05**2 + 0.08**2) ** 0.5 / 60**0.5, rel=0.15)


def test_implied_every_10th() -> None:
    # every step: 1.04x of which 3% own, so 1% slowdown per record step; every 10th: own 0.5% plus a tenth of that
    assert overhead.implied_every_10th((1.04, 0.01), 0.03, 0.005) == pytest.approx((1.006, 0.001))
