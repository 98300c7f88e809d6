"""Summaries of repeated measurements: centre, tails and spread.

Percentiles interpolate linearly between order statistics, exactly like numpy's default
(``method="linear"``), so a report can be checked against ``np.percentile`` on its samples.
The spread figure is the coefficient of variation (sample standard deviation over mean): a
run whose repetitions disagree by more than :data:`NOISY_CV` is flagged as noisy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

NOISY_CV = 0.10
"""Repetitions that vary by more than 10% of their mean make a figure unreliable."""


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    stdev: float
    """Sample standard deviation (n - 1 in the denominator); 0 for a single sample."""
    min: float
    max: float
    p50: float
    p90: float
    p99: float
    cv: float
    """Coefficient of variation, stdev / mean (0 when the mean is 0)."""
    samples: tuple[float, ...]

    @property
    def noisy(self) -> bool:
        return self.n > 1 and self.cv > NOISY_CV

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Summary:
        fields = dict(data)
        fields["samples"] = tuple(fields["samples"])  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as ``numpy.percentile``."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def summarize(samples: Sequence[float]) -> Summary:
    """Mean, sample stdev, min, max, p50/p90/p99 and coefficient of variation of ``samples``."""
    values = [float(s) for s in samples]
    if not values:
        raise ValueError("cannot summarize an empty list of samples")
    n = len(values)
    mean = math.fsum(values) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(
        n=n,
        mean=mean,
        stdev=stdev,
        min=min(values),
        max=max(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        cv=stdev / mean if mean else 0.0,
        samples=tuple(values),
    )
