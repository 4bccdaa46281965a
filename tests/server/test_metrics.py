"""The latency histogram's percentiles against exact ones."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from tierstack.server.metrics import LatencyHistogram, MethodMetrics

durations = st.lists(st.floats(min_value=1e-6, max_value=100.0, allow_nan=False), min_size=1, max_size=300)


@given(durations, st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]))
def test_percentiles_are_within_the_bucket_error(values: list[float], fraction: float) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    exact = sorted(values)[max(1, math.ceil(fraction * len(values))) - 1]
    reported = histogram.percentile(fraction)
    assert exact * (1 - 1e-9) <= reported <= exact * 2 ** (1 / 16) * (1 + 1e-9)
    assert histogram.count == len(values)
    assert histogram.max == max(values)


def test_an_empty_histogram_reports_zero() -> None:
    assert LatencyHistogram().percentile(0.99) == 0.0


def test_summaries_merge_codes_per_method() -> None:
    metrics = MethodMetrics()
    metrics.record("/a/B", "OK", 0.001)
    metrics.record("/a/B", "OK", 0.003)
    metrics.record("/a/B", "NOT_FOUND", 0.002)
    metrics.record("/a/C", "OK", 0.5)
    [summary] = metrics.summaries("/a/B")
    assert summary.count == 3
    assert summary.counts_by_code == {"NOT_FOUND": 1, "OK": 2}
    assert summary.max == 0.003
    assert [s.method for s in metrics.summaries()] == ["/a/B", "/a/C"]
