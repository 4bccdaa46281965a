"""The latency histogram's percentiles against exact ones."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierstack.server.metrics import LatencyHistogram, MethodMetrics

durations = st.lists(st.floats(min_value=1e-6, max_value=100.0, allow_nan=False), min_size=1, max_size=300)


@given(durations, st.sampled_from([0.5, 0.9, 0.95, 0.99, 0.999, 1.0]))
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


def test_the_summary_carries_the_99_9th_percentile() -> None:
    histogram = LatencyHistogram()
    for value in [0.001] * 998 + [0.5, 2.0]:  # the slowest two in a thousand
        histogram.record(value)
    stats = histogram.stats()
    assert stats.p99.ToNanoseconds() < 2_000_000 < 500_000_000 <= stats.p999.ToNanoseconds() < stats.max.ToNanoseconds()


def test_methods_merge_codes_and_keep_each_codes_latency() -> None:
    metrics = MethodMetrics()
    metrics.record("/a/B", "OK", 0.001)
    metrics.record("/a/B", "OK", 0.003)
    metrics.record("/a/B", "NOT_FOUND", 0.002)
    metrics.record("/a/C", "OK", 0.5)
    [method] = metrics.messages("/a/B")
    assert method.latency.count == 3
    assert dict(method.counts_by_code) == {"NOT_FOUND": 1, "OK": 2}
    assert method.latency.max.ToNanoseconds() == 3_000_000
    assert {code: stats.count for code, stats in method.latency_by_code.items()} == {"NOT_FOUND": 1, "OK": 2}
    assert [m.method for m in metrics.messages()] == ["/a/B", "/a/C"]


@given(durations, durations)
def test_a_window_holds_what_was_recorded_after_it_began(before: list[float], after: list[float]) -> None:
    histogram = LatencyHistogram()
    for value in before:
        histogram.record(value)
    earlier = LatencyHistogram.from_stats(histogram.stats())
    for value in after:
        histogram.record(value)
    window = LatencyHistogram.from_stats(histogram.stats()).since(earlier)
    only_after = LatencyHistogram()
    for value in after:
        only_after.record(value)
    assert window.count == len(after)
    assert window.percentile(0.95) == pytest.approx(only_after.percentile(0.95), rel=2 ** (1 / 16) - 1 + 1e-9)
