"""Paired bootstrap confidence intervals for per-probe score differences, in pure Python."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BootstrapCI:
    """Mean of the paired differences and its percentile bootstrap interval [low, high] over n pairs."""

    mean: float
    low: float
    high: float
    n: int


def _quantile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the quantile by linear interpolation between closest ranks (numpy's default method)."""
    position = (len(sorted_values) - 1) * fraction
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * weight


def paired_bootstrap_ci(
    deltas: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> BootstrapCI:
    """Compute the percentile bootstrap CI of the mean of paired differences (condition minus baseline).

    Resamples the differences with replacement `n_resamples` times using `random.Random(seed)`,
    so the same input and seed give the same interval on every platform and Python 3 version
    that keeps `random.Random.choices` unchanged. Raises ValueError for an empty or non-finite
    input, a confidence outside (0, 1) or fewer than one resample.

    Cost grows with len(deltas) * n_resamples. At the default 10,000 resamples it took about
    0.25 s for 101 differences and 1.5 s for 1,000 (CPython 3.11 on a busy 2-vCPU AMD EPYC VM).
    """
    values = [float(delta) for delta in deltas]
    if not values:
        raise ValueError("paired_bootstrap_ci needs at least one difference, got none")
    if not all(math.isfinite(value) for value in values):
        raise ValueError("paired_bootstrap_ci needs finite differences; drop NaN and infinite values first")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")

    count = len(values)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=count)) / count for _ in range(n_resamples))
    tail = (1 - confidence) / 2
    return BootstrapCI(
        mean=sum(values) / count,
        low=_quantile(means, tail),
        high=_quantile(means, 1 - tail),
        n=count,
    )
