"""``tierstack top``: a live view of the three tiers from Coordinate's ``WatchMetrics``.

Rates, percentiles and the latency histograms are those of the last interval (the difference of two
snapshots); the first frame, with nothing to compare, shows everything since each server started.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tierstack.client import MonitorClient, Tls
from tierstack.core.values import to_seconds
from tierstack.server.metrics import LatencyHistogram, is_work, latency_since, seconds_between
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb

TIERS = [common_pb2.TIER_COORDINATE, common_pb2.TIER_ORCHESTRATE, common_pb2.TIER_EXECUTE]
#: The latency ranges of the histogram bars: (upper bound in seconds, label).
BINS = [(0.001, "<1ms"), (0.005, "<5ms"), (0.025, "<25ms"), (0.1, "<100ms"), (1.0, "<1s"), (float("inf"), "≥1s")]
BAR_WIDTH = 30


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f}"


def _tier_panel(current: pb.TierMetrics, previous: pb.TierMetrics | None) -> Panel:
    name = common_pb2.Tier.Name(current.tier).removeprefix("TIER_").title()
    if current.HasField("error"):
        return Panel(Text(f"unreachable: {current.error.message}", style="red"), title=name)
    if previous is not None and previous.HasField("error"):
        previous = None
    seconds = seconds_between(current.process, previous.process if previous is not None else None)
    before = {m.method: m.latency for m in previous.methods} if previous is not None else {}
    table = Table("method", "calls/s", "p50 ms", "p99 ms", "p99.9 ms", "in flight", box=None, expand=True)
    merged = LatencyHistogram()
    for method in current.methods:
        if not is_work(method.method):
            continue
        window = latency_since(method.latency, before.get(method.method))
        merged.merge(window)
        table.add_row(
            method.method.rsplit("/", 1)[-1],
            f"{window.count / seconds:,.1f}",
            _ms(window.percentile(0.5)),
            _ms(window.percentile(0.99)),
            _ms(window.percentile(0.999)),
            str(method.in_flight),
        )
    bars = Table(box=None, show_header=False, padding=(0, 1))
    counts = [*merged.cumulative([bound for bound, _ in BINS[:-1]]), merged.count]
    in_bins = [count - below for below, count in zip([0, *counts], counts, strict=False)]
    largest = max(in_bins) or 1
    for (_, label), in_bin in zip(BINS, in_bins, strict=True):
        bars.add_row(label, Text("█" * round(BAR_WIDTH * in_bin / largest), style="cyan"), str(in_bin))
    process = current.process
    cpu_before = (to_seconds(previous.process.cpu_time) or 0.0) if previous is not None else 0.0
    cpu = (to_seconds(process.cpu_time) or 0.0) - cpu_before
    facts = [f"RSS {process.rss_bytes / 2**20:,.0f} MiB", f"CPU {cpu / seconds:.0%}"]
    domain = current.WhichOneof("domain")
    if domain == "orchestrate":
        runs = current.orchestrate.runs_by_state
        facts += [
            f"active runs {runs['RUN_STATE_RUNNING'] + runs['RUN_STATE_PENDING']}",
            f"queued steps {current.orchestrate.queue_depth}",
        ]
    elif domain == "coordinate":
        model = current.coordinate.model
        facts += [f"active goals {current.coordinate.active_goals}", f"model cache {model.cache_hit_rate:.0%}"]
    elif domain == "execute":
        facts.append(f"tools {len(current.execute.tools)}")
    return Panel(Group(Text("  ".join(facts), style="bold"), table, bars), title=name)


def _advice(recommendation: pb.Recommendation) -> str:
    """Says what to do about an alert, what it would gain and the work it asks for."""
    effort = pb.RecommendationEffort.Name(recommendation.effort).removeprefix("RECOMMENDATION_EFFORT_").lower()
    impact = recommendation.estimated_impact.summary
    return f"→ {recommendation.title} ({impact}; effort {effort}): {recommendation.action}"


def _alerts(alerts: Sequence[pb.Alert]) -> Panel:
    if not alerts:
        return Panel(Text("none", style="green"), title="Active alerts")
    table = Table("kind", "tier", "message", box=None, expand=True)
    for alert in alerts:
        table.add_row(
            pb.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_"),
            common_pb2.Tier.Name(alert.tier).removeprefix("TIER_").lower(),
            alert.message,
            style="red",
        )
        if alert.HasField("recommendation"):
            table.add_row("", "", _advice(alert.recommendation))
    return Panel(table, title="Active alerts")


def frame(current: pb.WatchMetricsResponse, previous: pb.WatchMetricsResponse | None) -> RenderableType:
    """Renders one snapshot against the one before it."""
    before = {tier.tier: tier for tier in previous.tiers} if previous is not None else {}
    panels = [_tier_panel(tier, before.get(tier.tier)) for tier in current.tiers]
    return Group(*panels, _alerts(current.active_alerts))


async def top(
    target: str, *, interval: float, frames: int, console: Console, tls: Tls | None = None, api_key: str = ""
) -> None:
    """Shows the live view until interrupted, or for ``frames`` snapshots when it is not zero."""
    previous: pb.WatchMetricsResponse | None = None
    shown = 0
    async with MonitorClient(target, tls=tls, api_key=api_key) as monitor:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            async for snapshot in monitor.watch_metrics(interval, tiers=TIERS):
                live.update(frame(snapshot, previous), refresh=True)
                previous = snapshot
                shown += 1
                if frames and shown >= frames:
                    break
