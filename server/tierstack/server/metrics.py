"""Latency histograms per RPC method and status code, in plain Python."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

# Sixteen buckets per doubling bound the error of a reported percentile to 2**(1/16) - 1, about 4.4 %.
_BUCKETS_PER_DOUBLING = 16
_SMALLEST = 1e-6  # one microsecond; faster calls land in the first bucket


class LatencyHistogram:
    """A log-bucketed histogram of durations in seconds, cheap to record into."""

    __slots__ = ("_buckets", "count", "max", "total")

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        """Adds one observation."""
        index = int(math.log2(max(seconds, _SMALLEST) / _SMALLEST) * _BUCKETS_PER_DOUBLING)
        self._buckets[index] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        """Adds every observation of ``other``."""
        self._buckets.update(other._buckets)
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, fraction: float) -> float:
        """Returns the duration below which ``fraction`` (0..1) of observations fall; 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                upper = _SMALLEST * 2 ** ((index + 1) / _BUCKETS_PER_DOUBLING)
                return min(upper, self.max)
        return self.max


@dataclass(frozen=True, slots=True)
class MethodSummary:
    """The calls of one method: counts by status code and latency percentiles in seconds."""

    method: str
    count: int
    counts_by_code: dict[str, int]
    p50: float
    p95: float
    p99: float
    max: float


class MethodMetrics:
    """Histograms keyed by (method, status code name)."""

    def __init__(self) -> None:
        self._histograms: dict[tuple[str, str], LatencyHistogram] = {}

    def record(self, method: str, code: str, seconds: float) -> None:
        """Records one finished call."""
        key = (method, code)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = LatencyHistogram()
        histogram.record(seconds)

    def summaries(self, method_filter: str = "") -> list[MethodSummary]:
        """Summarises every method whose name contains ``method_filter``, ordered by name."""
        by_method: dict[str, dict[str, LatencyHistogram]] = {}
        for (method, code), histogram in self._histograms.items():
            if method_filter in method:
                by_method.setdefault(method, {})[code] = histogram
        result = []
        for method in sorted(by_method):
            merged = LatencyHistogram()
            for histogram in by_method[method].values():
                merged.merge(histogram)
            result.append(
                MethodSummary(
                    method=method,
                    count=merged.count,
                    counts_by_code={code: h.count for code, h in sorted(by_method[method].items())},
                    p50=merged.percentile(0.50),
                    p95=merged.percentile(0.95),
                    p99=merged.percentile(0.99),
                    max=merged.max,
                )
            )
        return result
