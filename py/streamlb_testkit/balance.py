"""How even a load spread is: max/mean, and what the LPT oracle reaches on the same rates."""

from __future__ import annotations

from typing import Iterable


def max_over_mean(values: Iterable[float]) -> float:
    """Largest over mean; inf when the mean is 0."""
    values = list(values)
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else float("inf")


def lpt_max_over_mean(rates: Iterable[float], pods: int) -> float:
    """max/mean of Longest Processing Time first (each rate onto the least-loaded of `pods`
    equal pods, largest first): a near-optimal static placement."""
    loads = [0.0] * pods
    for rate in sorted(rates, reverse=True):
        loads[loads.index(min(loads))] += rate
    return max_over_mean(loads)
