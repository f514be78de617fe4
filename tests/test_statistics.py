"""Tests of the paired bootstrap confidence interval."""

from __future__ import annotations

import math
import random

import pytest

from lem_fixtures.statistics import BootstrapCI, paired_bootstrap_ci


def test_same_seed_same_interval():
    rng = random.Random(1)
    deltas = [rng.gauss(0.5, 2.0) for _ in range(50)]

    assert paired_bootstrap_ci(deltas, seed=3) == paired_bootstrap_ci(deltas, seed=3)
    assert paired_bootstrap_ci(deltas, seed=3) != paired_bootstrap_ci(deltas, seed=4)


def test_interval_contains_mean_and_is_ordered():
    rng = random.Random(7)
    deltas = [rng.gauss(1.0, 3.0) for _ in range(101)]
    interval = paired_bootstrap_ci(deltas)

    assert interval.n == 101
    assert interval.mean == pytest.approx(sum(deltas) / len(deltas))
    assert interval.low < interval.mean < interval.high


def test_interval_width_matches_normal_approximation():
    rng = random.Random(11)
    deltas = [rng.gauss(0.0, 2.0) for _ in range(400)]
    interval = paired_bootstrap_ci(deltas, n_resamples=4000)

    mean = sum(deltas) / len(deltas)
    spread = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
    expected_half_width = 1.96 * spread / math.sqrt(len(deltas))
    assert (interval.high - interval.low) / 2 == pytest.approx(expected_half_width, rel=0.1)


def test_constant_differences_give_zero_width():
    assert paired_bootstrap_ci([2.5] * 10) == BootstrapCI(mean=2.5, low=2.5, high=2.5, n=10)


def test_single_difference():
    assert paired_bootstrap_ci([-1.0]) == BootstrapCI(mean=-1.0, low=-1.0, high=-1.0, n=1)


def test_higher_confidence_is_wider():
    rng = random.Random(5)
    deltas = [rng.uniform(-3, 3) for _ in range(60)]
    narrow = paired_bootstrap_ci(deltas, confidence=0.8)
    wide = paired_bootstrap_ci(deltas, confidence=0.99)

    assert wide.low < narrow.low
    assert wide.high > narrow.high


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deltas": []}, "paired_bootstrap_ci needs at least one difference, got none"),
        ({"deltas": [1.0, math.nan]}, "paired_bootstrap_ci needs finite differences; drop NaN and infinite values first"),
        ({"deltas": [1.0], "confidence": 1.0}, "confidence must be between 0 and 1 (exclusive), got 1.0"),
        ({"deltas": [1.0], "n_resamples": 0}, "n_resamples must be at least 1, got 0"),
    ],
)
def test_invalid_input(kwargs, message):
    with pytest.raises(ValueError) as raised:
        paired_bootstrap_ci(**kwargs)
    assert str(raised.value) == message
