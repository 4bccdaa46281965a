"""The recent window of a tier's metrics, which advice is judged on: what the tier did since a snapshot
taken about a window ago, so that an old or fixed incident stops calling for advice and a fresh one is
not diluted by the whole life of the server.

The tiers report counters and histograms since they started (``GetMetrics`` and Prometheus keep
them); a window is their difference from an earlier snapshot. A :class:`History` keeps a few
snapshots, a slot of the window apart, each cut down to the figures advice reads: its memory is
bounded by the number of slots, however long the server runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tierstack.core.values import to_seconds
from tierstack.server.metrics import latency_since
from tierstack.v1 import monitor_service_pb2 as pb

#: How many snapshots a window is cut into: its start is known to within a tenth of it.
SLOTS = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Recent:
    """A tier's metrics over a recent window.

    Attributes:
        metrics: The figures advice reads (model calls, decompositions, tools, event-log flushes,
            plans), counted within the window; see :func:`difference`.
        seconds: How long the window is.
    """

    metrics: pb.TierMetrics
    seconds: float


def difference(current: pb.TierMetrics, earlier: pb.TierMetrics | None = None) -> pb.TierMetrics:
    """Returns the figures advice reads of ``current``, counted after ``earlier`` (since the tier started
    without it); the rest of ``current`` (its RPC methods and other domain figures) is left out."""
    before = earlier if earlier is not None else pb.TierMetrics()
    recent = pb.TierMetrics(tier=current.tier, collect_time=current.collect_time, process=current.process)
    domain = current.WhichOneof("domain")
    if domain == "coordinate":
        recent.coordinate.model.CopyFrom(_model(current.coordinate.model, before.coordinate.model))
        for source, stats in current.coordinate.decomposition_latency.items():
            earlier_stats = before.coordinate.decomposition_latency.get(source)
            recent.coordinate.decomposition_latency[source].CopyFrom(latency_since(stats, earlier_stats).stats())
    elif domain == "execute":
        recent.execute.model.CopyFrom(_model(current.execute.model, before.execute.model))
        tools = {tool.name: tool for tool in before.execute.tools}
        for tool in current.execute.tools:
            earlier_tool = tools.get(tool.name, pb.ToolMetrics())
            recent.execute.tools.add(
                name=tool.name,
                failures=tool.failures - earlier_tool.failures,
                latency=latency_since(tool.latency, earlier_tool.latency).stats(),
            )
    elif domain == "orchestrate":
        now, then = current.orchestrate, before.orchestrate
        recent.orchestrate.flush_latency.CopyFrom(latency_since(now.flush_latency, then.flush_latency).stats())
        recent.orchestrate.plan_cache_hits = now.plan_cache_hits - then.plan_cache_hits
        recent.orchestrate.plan_cache_misses = now.plan_cache_misses - then.plan_cache_misses
    return recent


def _model(current: pb.ModelMetrics, earlier: pb.ModelMetrics) -> pb.ModelMetrics:
    hits = current.cache_hits - earlier.cache_hits
    lookups = current.cache_lookups - earlier.cache_lookups
    return pb.ModelMetrics(
        requests=current.requests - earlier.requests,
        cache_hits=hits,
        cache_lookups=lookups,
        cache_hit_rate=hits / lookups if lookups else 0.0,
        latency=latency_since(current.latency, earlier.latency).stats(),
    )


def _counts(metrics: pb.TierMetrics) -> dict[str, int]:
    """Returns the counters advice reads, by name: each only grows while the tier's process lives."""
    model = metrics.coordinate.model if metrics.HasField("coordinate") else metrics.execute.model
    counts = {"model.requests": model.requests, "model.cache_lookups": model.cache_lookups}
    for source, stats in metrics.coordinate.decomposition_latency.items():
        counts[f"decompositions.{source}"] = stats.count
    for tool in metrics.execute.tools:
        counts[f"tools.{tool.name}"] = tool.latency.count
    orchestrate = metrics.orchestrate
    counts["flushes"] = orchestrate.flush_latency.count
    counts["plans"] = orchestrate.plan_cache_hits + orchestrate.plan_cache_misses
    return counts


def _behind(current: pb.TierMetrics, earlier: pb.TierMetrics) -> bool:
    """Tells whether ``current`` counted less than ``earlier`` did: the tier restarted between them."""
    now = _counts(current)
    return any(now.get(name, 0) < count for name, count in _counts(earlier).items())


def _uptime(metrics: pb.TierMetrics) -> float:
    return to_seconds(metrics.process.uptime) or 0.0


class History:
    """Snapshots of one tier, timed by the tier's own uptime, for windows of ``window`` seconds.

    Args:
        window: How far back advice looks, in seconds.
    """

    def __init__(self, window: float) -> None:
        self._window = window
        self._snapshots: deque[tuple[float, pb.TierMetrics]] = deque()  # (uptime, figures), oldest first

    def add(self, snapshot: pb.TierMetrics) -> None:
        """Keeps ``snapshot`` when the newest one kept is a slot older, and forgets those that no window
        reaches any more."""
        uptime = _uptime(snapshot)
        if self._snapshots and (uptime < self._snapshots[-1][0] or _behind(snapshot, self._snapshots[-1][1])):
            self._snapshots.clear()  # the tier restarted: its counters began again
        if self._snapshots and uptime - self._snapshots[-1][0] < self._window / SLOTS:
            return
        self._snapshots.append((uptime, difference(snapshot)))
        # The newest snapshot older than the window stays: it bounds the window while no newer one exists.
        while len(self._snapshots) > 1 and uptime - self._snapshots[1][0] > self._window:
            self._snapshots.popleft()

    def recent(self, current: pb.TierMetrics) -> Recent:
        """Returns what the tier did in the window ending at ``current``: since the oldest moment within
        the window whose counters are known (its start, when it is younger than the window, or a
        snapshot), else since the newest snapshot before the window."""
        now = _uptime(current)
        known: list[tuple[float, pb.TierMetrics | None]] = [(0.0, None)]
        # A snapshot later than now, or one that counted more than the tier has now, is of a process
        # that has since restarted: its counters began again.
        known += [(uptime, kept) for uptime, kept in self._snapshots if uptime <= now and not _behind(current, kept)]
        within = [moment for moment in known if now - moment[0] <= self._window]
        start, earlier = within[0] if within else known[-1]
        seconds = now - start
        if earlier is None:  # since the tier's start, which may be later than its process's
            seconds = min(seconds, self._window)
        return Recent(metrics=difference(current, earlier), seconds=seconds)
