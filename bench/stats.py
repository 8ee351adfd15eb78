"""Small statistics helpers (no numpy on the machine)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    if not ordered:
        return float("nan")
    i = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return float(ordered[i])


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds of values in seconds, and how many there were."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": quantile(ordered, 0.50) * 1000,
        "p99_ms": quantile(ordered, 0.99) * 1000,
        "max_ms": (ordered[-1] * 1000) if ordered else float("nan"),
    }
