"""The cross-tier monitor (Coordinate): gathers the three tiers' metrics, raises and resolves alerts
on an interval, each with what to do about it, and gives recommendations judged on a recent window."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass

from tierstack.client import MonitorClient, TierstackError, Tls
from tierstack.client.defaults import DEFAULT_MAX_MESSAGE_BYTES
from tierstack.core.errors import ResourceExhaustedError, Violation, error_detail_of_call
from tierstack.core.values import now_timestamp, to_seconds
from tierstack.server.advice import DEFAULT_ADVICE, AdviceThresholds, answer, recommend
from tierstack.server.metrics import LatencyHistogram, is_work, latency_since, seconds_between
from tierstack.server.window import History, Recent
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb

_log = logging.getLogger(__name__)

Snapshot = Callable[[str], pb.TierMetrics]
#: Status codes that mean the server failed, not the caller.
SERVER_FAULTS = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNIMPLEMENTED"})
#: How many alert events a slow watcher may fall behind before it is dropped.
WATCHER_BACKLOG = 1000


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """When alerts are raised.

    Attributes:
        response_time_seconds: A method's p95 over one interval above this raises HIGH_RESPONSE_TIME.
        error_rate: A tier's share of server-fault statuses over one interval above this raises
            HIGH_ERROR_RATE.
        memory_bytes: A server's resident memory above this raises HIGH_MEMORY_USAGE.
        min_throughput: A tier with traffic serving fewer calls per second than this raises
            LOW_THROUGHPUT; 0 turns it off.
        latency_regression: A method's p95 worse than its rolling baseline by more than this share
            raises LATENCY_REGRESSION.
        throughput_regression: A tier's calls per second below its rolling baseline by more than this
            share raises THROUGHPUT_REGRESSION.
        baseline_intervals: How many past intervals make the rolling baselines.
        min_calls: Intervals with fewer calls than this say nothing about latency or error rates.
    """

    response_time_seconds: float = 5.0
    error_rate: float = 0.05
    memory_bytes: int = 1 << 30
    min_throughput: float = 0.0
    latency_regression: float = 0.2
    throughput_regression: float = 0.5
    baseline_intervals: int = 12
    min_calls: int = 10


@dataclass(slots=True)
class _Window:
    """One tier's calls between two snapshots."""

    seconds: float
    methods: dict[str, tuple[LatencyHistogram, int]]  # method -> (latencies, server faults)

    @property
    def calls(self) -> int:
        return sum(histogram.count for histogram, _ in self.methods.values())

    @property
    def faults(self) -> int:
        return sum(faults for _, faults in self.methods.values())


def _window(previous: pb.TierMetrics, current: pb.TierMetrics) -> _Window:
    before = {m.method: m for m in previous.methods}
    methods = {}
    for method in current.methods:
        if not is_work(method.method):
            continue
        earlier = before.get(method.method)
        histogram = latency_since(method.latency, earlier.latency if earlier is not None else None)
        faults = _faults(method) - (_faults(earlier) if earlier is not None else 0)
        if histogram.count:
            methods[method.method] = (histogram, faults)
    return _Window(seconds_between(current.process, previous.process), methods)


def _faults(method: pb.MethodMetrics) -> int:
    return sum(count for code, count in method.counts_by_code.items() if code in SERVER_FAULTS)


def _tier(tier: common_pb2.Tier.ValueType) -> str:
    return common_pb2.Tier.Name(tier).removeprefix("TIER_").lower()


class CrossTierMonitor:
    """Watches all three tiers.

    Args:
        tier: The tier of the server it runs in (its metrics are read in process).
        peers: The other tiers' targets.
        interval: How often alerts are evaluated, in seconds.
        thresholds: When alerts are raised.
        advice: When recommendations are given, and the window they are judged on.
        max_message_bytes: The largest message the peers' metrics may come in.
        tls: The TLS of the calls to the peers; plaintext when None.
        metadata: Sent with every call to the peers (the tier's key).
    """

    def __init__(
        self,
        tier: common_pb2.Tier.ValueType,
        peers: dict[common_pb2.Tier.ValueType, str],
        *,
        interval: float = 5.0,
        thresholds: Thresholds = Thresholds(),
        advice: AdviceThresholds = DEFAULT_ADVICE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: Tls | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._advice = advice
        self.tier = tier
        self._clients = {
            peer: MonitorClient(target, timeout=5.0, max_message_bytes=max_message_bytes, tls=tls, metadata=metadata)
            for peer, target in peers.items()
        }
        self._local: Snapshot | None = None
        self._interval = interval
        self._thresholds = thresholds
        self._previous: dict[common_pb2.Tier.ValueType, pb.TierMetrics] = {}
        self._histories = {tier: History(advice.window_seconds) for tier in self.tiers}
        self._latency_baselines: dict[str, deque[float]] = {}
        self._rate_baselines: dict[common_pb2.Tier.ValueType, deque[float]] = {}
        self._active: dict[str, pb.Alert] = {}
        self._watchers: set[asyncio.Queue[pb.Alert | None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def tiers(self) -> tuple[common_pb2.Tier.ValueType, ...]:
        """Returns every tier it watches, top down."""
        return tuple(sorted((self.tier, *self._clients)))

    def attach(self, snapshot: Snapshot) -> None:
        """Gives it the metrics of its own server."""
        self._local = snapshot

    async def start(self) -> None:
        """Starts evaluating alerts on the interval."""
        self._task = asyncio.create_task(self._watch(), name="tierstack-cross-tier-monitor")

    async def close(self) -> None:
        """Stops evaluating and closes its clients."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in self._clients.values():
            await client.close()

    async def metrics(self, tier: common_pb2.Tier.ValueType, method_filter: str = "") -> pb.TierMetrics:
        """Returns one tier's metrics; an unreachable tier's carry the error instead."""
        if tier == self.tier:
            assert self._local is not None, "attach() the server's own metrics first"
            return self._local(method_filter)
        try:
            [found] = (await self._clients[tier].get_metrics(method_filter)).tiers
            return found
        except TierstackError as exc:
            return pb.TierMetrics(tier=tier, collect_time=now_timestamp(), error=error_detail_of_call(exc, tier))

    async def all_metrics(
        self, tiers: Iterable[common_pb2.Tier.ValueType] = (), method_filter: str = ""
    ) -> list[pb.TierMetrics]:
        """Returns the metrics of ``tiers`` (all when empty), gathered at once."""
        return list(await asyncio.gather(*(self.metrics(t, method_filter) for t in (tuple(tiers) or self.tiers))))

    async def recommendations(self) -> list[pb.Recommendation]:
        """Returns the advice the tiers' metrics of the recent window call for, the most impactful first."""
        return recommend(self._recent(await self.all_metrics()), self._advice)

    def _recent(self, tiers: Iterable[pb.TierMetrics]) -> list[Recent]:
        return [self._histories[t.tier].recent(t) for t in tiers if not t.HasField("error")]

    def active_alerts(self) -> list[pb.Alert]:
        """Returns the active alerts, oldest first."""
        return sorted(self._active.values(), key=lambda alert: alert.raise_time.ToNanoseconds())

    async def alerts(self) -> AsyncGenerator[pb.Alert]:
        """Yields the active alerts, then every alert raised or resolved from now on."""
        queue: asyncio.Queue[pb.Alert | None] = asyncio.Queue(WATCHER_BACKLOG)
        self._watchers.add(queue)
        try:
            for active in self.active_alerts():
                yield active
            while (alert := await queue.get()) is not None:
                yield alert
            raise ResourceExhaustedError(
                [Violation("alerts", f"the watcher fell {WATCHER_BACKLOG} alert events behind; watch again")]
            )
        finally:
            self._watchers.discard(queue)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                _log.exception("evaluating alerts failed; trying again next interval")

    async def check(self) -> None:
        """Takes a snapshot of every tier, raises or resolves alerts against the previous one, and gives
        each alert what to do about it from the advice of the recent window."""
        snapshots = [current for current in await self.all_metrics() if not current.HasField("error")]
        advice = recommend(self._recent(snapshots), self._advice)
        raised: dict[str, pb.Alert] = {}
        for current in snapshots:
            for alert in self._conditions(current):
                alert.recommendation.CopyFrom(answer(alert, advice, self._interval))
                raised[alert.id] = alert
            self._previous[current.tier] = current
            self._histories[current.tier].add(current)
        now = now_timestamp()
        for alert_id, alert in raised.items():
            known = self._active.get(alert_id)
            if known is not None:
                known.value, known.message = alert.value, alert.message
                known.recommendation.CopyFrom(alert.recommendation)
                continue
            alert.raise_time.CopyFrom(now)
            self._active[alert_id] = alert
            _log.warning("alert raised: %s", alert.message)
            self._publish(alert)
        for alert_id in [a for a in self._active if a not in raised]:
            alert = self._active.pop(alert_id)
            alert.resolve_time.CopyFrom(now)
            _log.info("alert resolved: %s", alert.message)
            self._publish(alert)

    def _publish(self, alert: pb.Alert) -> None:
        for queue in list(self._watchers):
            try:
                queue.put_nowait(pb.Alert.FromString(alert.SerializeToString()))
            except asyncio.QueueFull:  # told so in place of its oldest event, then dropped
                _log.warning("an alert watcher fell %d events behind and was dropped", WATCHER_BACKLOG)
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    def _conditions(self, current: pb.TierMetrics) -> list[pb.Alert]:
        limits = self._thresholds
        tier = current.tier
        name = _tier(tier)
        found = []

        def alert(kind: pb.AlertKind.ValueType, message: str, value: float, threshold: float, method: str = "") -> None:
            alert_id = f"{pb.AlertKind.Name(kind).removeprefix('ALERT_KIND_')}:{name}:{method}"
            found.append(
                pb.Alert(
                    id=alert_id, kind=kind, tier=tier, method=method, message=message, value=value, threshold=threshold
                )
            )

        rss = current.process.rss_bytes
        if rss > limits.memory_bytes:
            alert(
                pb.ALERT_KIND_HIGH_MEMORY_USAGE,
                f"{name} uses {rss / 2**20:.0f} MiB of memory (threshold {limits.memory_bytes / 2**20:.0f} MiB)",
                rss,
                limits.memory_bytes,
            )
        if current.orchestrate.store_failing:
            age = to_seconds(current.orchestrate.store_write_age) or 0.0
            queued = current.orchestrate.queued_events
            alert(
                pb.ALERT_KIND_STORE_UNAVAILABLE,
                f"{name} cannot write to its store (nothing stored for {age:.0f} s; {queued} events wait)",
                age,
                0.0,
            )
        previous = self._previous.get(tier)
        if previous is None:
            return found
        window = _window(previous, current)
        calls, rate = window.calls, window.calls / window.seconds
        if calls >= limits.min_calls and window.faults / calls > limits.error_rate:
            share = window.faults / calls
            alert(
                pb.ALERT_KIND_HIGH_ERROR_RATE,
                f"{name}: {share:.1%} of calls failed (threshold {limits.error_rate:.1%})",
                share,
                limits.error_rate,
            )
        if limits.min_throughput and calls and rate < limits.min_throughput:
            alert(
                pb.ALERT_KIND_LOW_THROUGHPUT,
                f"{name} serves {rate:.2f} calls/s (threshold {limits.min_throughput:g})",
                rate,
                limits.min_throughput,
            )
        rates = self._rate_baselines.setdefault(tier, deque(maxlen=limits.baseline_intervals))
        baseline = statistics.fmean(rates) if len(rates) >= 3 else 0.0
        if baseline >= 1.0 and rate < baseline * (1 - limits.throughput_regression):
            alert(
                pb.ALERT_KIND_THROUGHPUT_REGRESSION,
                f"{name} serves {rate:.1f} calls/s, down from a baseline of {baseline:.1f}",
                rate,
                baseline,
            )
        rates.append(rate)
        for method, (histogram, _) in window.methods.items():
            p95 = histogram.percentile(0.95)
            if p95 > limits.response_time_seconds:
                alert(
                    pb.ALERT_KIND_HIGH_RESPONSE_TIME,
                    f"{method}: p95 {p95 * 1000:.0f} ms (threshold {limits.response_time_seconds * 1000:.0f} ms)",
                    p95,
                    limits.response_time_seconds,
                    method,
                )
            if histogram.count < limits.min_calls:
                continue
            history = self._latency_baselines.setdefault(method, deque(maxlen=limits.baseline_intervals))
            if len(history) >= 3 and p95 > (baseline := statistics.fmean(history)) * (1 + limits.latency_regression):
                alert(
                    pb.ALERT_KIND_LATENCY_REGRESSION,
                    f"{method}: p95 {p95 * 1000:.1f} ms, worse than its baseline of {baseline * 1000:.1f} ms",
                    p95,
                    baseline,
                    method,
                )
            history.append(p95)
        return found
