"""Sample statistics both sides report: nearest-rank percentiles.

The p-th percentile of n samples is the ceil(p/100 * n)-th smallest (no
interpolation, no numpy), so every value shown was measured. The mocked
guest's summary, the launch summary and the benchmarks compute theirs
here; the backend's live histograms (backend/observe/metrics.py) are HDR
histograms and show the same PERCENTILES under the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

PERCENTILES = (50, 90, 99)
PERCENTILE_KEYS = tuple(f"p{p}" for p in PERCENTILES)  # "p50", "p90", "p99"
SUMMARY_KEYS = (*PERCENTILE_KEYS, "max")  # the keys of percentiles()


def nearest_rank(sorted_samples: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile of already sorted samples (0.0 when empty)."""
    if not sorted_samples:
        return 0.0
    if not 0 < percent <= 100:
        raise ValueError(f"percentile {percent} outside (0, 100]")
    rank = max(1, math.ceil(percent / 100 * len(sorted_samples)))
    return float(sorted_samples[rank - 1])


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """{"p50", "p90", "p99", "max"} of the samples (all 0.0 when empty)."""
    ordered = sorted(samples)
    summary = {
        key: nearest_rank(ordered, p) for key, p in zip(PERCENTILE_KEYS, PERCENTILES, strict=True)
    }
    summary["max"] = float(ordered[-1]) if ordered else 0.0
    return summary


def format_percentiles(
    values: Mapping[str, float], *, digits: int = 0, separator: str = " "
) -> str:
    """A percentiles() mapping on one line of a table: "p50 V p90 V p99 V max V"."""
    return separator.join(f"{key} {values[key]:.{digits}f}" for key in SUMMARY_KEYS)
