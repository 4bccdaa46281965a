"""Latency histograms per RPC method and status code, process metrics and rates, in plain Python,
and their wire form."""

from __future__ import annotations

import collections
import math
import resource
import time
from collections import Counter
from pathlib import Path

from tierstack.core.values import to_duration, to_seconds
from tierstack.v1 import monitor_service_pb2 as monitor_pb

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

    def since(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """Returns the observations made after ``earlier`` was taken of this histogram (its maximum is
        the upper bound of the slowest bucket that grew)."""
        window = LatencyHistogram()
        window._buckets = self._buckets - earlier._buckets
        window.count = sum(window._buckets.values())
        window.total = max(self.total - earlier.total, 0.0)
        window.max = min(self.max, _upper(max(window._buckets))) if window._buckets else 0.0
        return window

    def cumulative(self, bounds: list[float]) -> list[int]:
        """Returns how many observations are at most each bound (for Prometheus buckets)."""
        counts = [0] * len(bounds)
        for index, count in self._buckets.items():
            upper = _upper(index)
            for position, bound in enumerate(bounds):
                if upper <= bound * (1 + 1e-9):
                    counts[position] += count
        return counts

    def stats(self) -> monitor_pb.LatencyStats:
        """Returns the histogram in its wire form, with its percentiles."""
        return monitor_pb.LatencyStats(
            count=self.count,
            p50=to_duration(self.percentile(0.50)),
            p90=to_duration(self.percentile(0.90)),
            p95=to_duration(self.percentile(0.95)),
            p99=to_duration(self.percentile(0.99)),
            p999=to_duration(self.percentile(0.999)),
            max=to_duration(self.max),
            histogram=monitor_pb.Histogram(buckets=dict(self._buckets), sum_seconds=self.total),
        )

    @classmethod
    def from_stats(cls, stats: monitor_pb.LatencyStats) -> LatencyHistogram:
        """Returns the histogram a :meth:`stats` message holds."""
        histogram = cls()
        histogram._buckets = Counter(dict(stats.histogram.buckets))
        histogram.count = sum(histogram._buckets.values())
        histogram.total = stats.histogram.sum_seconds
        histogram.max = to_seconds(stats.max) or 0.0
        return histogram

    def percentile(self, fraction: float) -> float:
        """Returns the duration below which ``fraction`` (0..1) of observations fall; 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(_upper(index), self.max)
        return self.max


def _upper(index: int) -> float:
    """Returns the upper bound of bucket ``index``, in seconds."""
    return _SMALLEST * 2 ** ((index + 1) / _BUCKETS_PER_DOUBLING)


class MethodMetrics:
    """Histograms keyed by (method, status code name), with the calls in flight and the messages
    streams sent, per method."""

    def __init__(self) -> None:
        self._histograms: dict[tuple[str, str], LatencyHistogram] = {}
        self.in_flight: Counter[str] = Counter()
        self.stream_messages: Counter[str] = Counter()

    def record(self, method: str, code: str, seconds: float) -> None:
        """Records one finished call."""
        key = (method, code)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = LatencyHistogram()
        histogram.record(seconds)

    def _by_method(self, method_filter: str) -> dict[str, dict[str, LatencyHistogram]]:
        by_method: dict[str, dict[str, LatencyHistogram]] = {}
        for (method, code), histogram in self._histograms.items():
            if method_filter in method:
                by_method.setdefault(method, {})[code] = histogram
        for method, count in self.in_flight.items():
            if count and method_filter in method:
                by_method.setdefault(method, {})
        return by_method

    def messages(self, method_filter: str = "") -> list[monitor_pb.MethodMetrics]:
        """Returns every method whose name contains ``method_filter`` in its wire form, by name."""
        return [
            monitor_pb.MethodMetrics(
                method=method,
                counts_by_code={code: h.count for code, h in codes.items()},
                latency=_merged(codes.values()).stats(),
                latency_by_code={code: h.stats() for code, h in codes.items()},
                in_flight=self.in_flight[method],
                stream_messages=self.stream_messages[method],
            )
            for method, codes in sorted(self._by_method(method_filter).items())
        ]


#: The RPCs that carry other calls over a long-lived stream; each call they carry is counted as a
#: call of the RPC it stands for.
CARRIERS = frozenset({"ExecuteStream", "WatchRuns"})


def is_work(method: str) -> bool:
    """Says whether a method's calls are the tier's work, worth rates and alerts: not gRPC's own
    services, not monitoring, and not subscriptions (``Watch…``) or :data:`CARRIERS`, which last as
    long as their callers want."""
    name = method.rsplit("/", 1)[-1]
    long_lived = name.startswith("Watch") or name in CARRIERS
    return "/grpc." not in method and "MonitorService" not in method and not long_lived


def latency_since(current: monitor_pb.LatencyStats, previous: monitor_pb.LatencyStats | None) -> LatencyHistogram:
    """Returns the observations of ``current`` made after ``previous`` (all of them without one)."""
    histogram = LatencyHistogram.from_stats(current)
    return histogram if previous is None else histogram.since(LatencyHistogram.from_stats(previous))


def seconds_between(current: monitor_pb.ProcessMetrics, previous: monitor_pb.ProcessMetrics | None) -> float:
    """Returns how long a process ran between two snapshots (since it started without the earlier one)."""
    earlier = (to_seconds(previous.uptime) or 0.0) if previous is not None else 0.0
    return max((to_seconds(current.uptime) or 0.0) - earlier, 1e-3)


def _merged(histograms: collections.abc.Iterable[LatencyHistogram]) -> LatencyHistogram:
    merged = LatencyHistogram()
    for histogram in histograms:
        merged.merge(histogram)
    return merged


_STARTED = time.monotonic()
_STATM = Path("/proc/self/statm")
_PAGE = resource.getpagesize()


def process_metrics() -> monitor_pb.ProcessMetrics:
    """Returns this process's resident memory, CPU time and uptime (``/proc`` is in memory: no I/O wait)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        rss = int(_STATM.read_text().split()[1]) * _PAGE
    except OSError:  # not Linux: the peak is the best there is
        rss = usage.ru_maxrss * 1024
    return monitor_pb.ProcessMetrics(
        rss_bytes=rss,
        cpu_time=to_duration(usage.ru_utime + usage.ru_stime),
        uptime=to_duration(time.monotonic() - _STARTED),
    )


class RateMeter:
    """Counts events per second over a sliding window of whole seconds.

    Args:
        seconds: The window.
    """

    def __init__(self, seconds: int = 10) -> None:
        self._seconds = seconds
        self._counts: collections.deque[tuple[int, int]] = collections.deque()

    def add(self, count: int = 1) -> None:
        """Counts ``count`` events now."""
        now = int(time.monotonic())
        if self._counts and self._counts[-1][0] == now:
            self._counts[-1] = (now, self._counts[-1][1] + count)
        else:
            self._counts.append((now, count))
            while self._counts[0][0] <= now - self._seconds:
                self._counts.popleft()

    def rate(self) -> float:
        """Returns the events per second over the window."""
        cutoff = int(time.monotonic()) - self._seconds
        return sum(count for second, count in self._counts if second > cutoff) / self._seconds
