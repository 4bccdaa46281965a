"""Alert evaluation and recommendations on scripted snapshots: each rule raises on its condition,
resolves when it passes, and regressions are judged against a rolling baseline."""

from __future__ import annotations

import asyncio

import pytest

from tierstack.core.errors import ResourceExhaustedError
from tierstack.core.values import to_duration
from tierstack.server.advice import ANSWERS, answer, recommend
from tierstack.server.crosstier import WATCHER_BACKLOG, CrossTierMonitor, Thresholds
from tierstack.server.metrics import LatencyHistogram, MethodMetrics
from tierstack.server.window import Recent
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb

METHOD = "/tierstack.v1.ExecutorService/ExecuteTool"


class Script:
    """A tier whose calls the test makes up, one second apart."""

    def __init__(self) -> None:
        self.metrics = MethodMetrics()
        self.uptime = 0.0
        self.rss = 50 * 2**20

    def calls(self, count: int, seconds: float, code: str = "OK") -> None:
        for _ in range(count):
            self.metrics.record(METHOD, code, seconds)

    def snapshot(self, method_filter: str = "") -> pb.TierMetrics:
        self.uptime += 1.0
        return pb.TierMetrics(
            tier=common_pb2.TIER_EXECUTE,
            methods=self.metrics.messages(method_filter),
            process=pb.ProcessMetrics(rss_bytes=self.rss, uptime=to_duration(self.uptime)),
        )


def monitor(script: Script, **thresholds: float) -> CrossTierMonitor:
    watched = CrossTierMonitor(common_pb2.TIER_EXECUTE, {}, thresholds=Thresholds(min_calls=5, **thresholds))  # type: ignore[arg-type]
    watched.attach(script.snapshot)
    return watched


def kinds(watched: CrossTierMonitor) -> set[str]:
    return {pb.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_") for alert in watched.active_alerts()}


async def test_error_rate_memory_and_throughput_raise_then_resolve() -> None:
    script = Script()
    watched = monitor(script, error_rate=0.1, memory_bytes=100 * 2**20, min_throughput=20)
    await watched.check()  # the first snapshot: nothing to compare yet
    script.calls(8, 0.01)
    script.calls(2, 0.01, "INTERNAL")
    script.calls(5, 0.01, "INVALID_ARGUMENT")  # the caller's fault: not counted as failures
    script.rss = 200 * 2**20
    await watched.check()
    assert kinds(watched) == {"HIGH_ERROR_RATE", "HIGH_MEMORY_USAGE", "LOW_THROUGHPUT"}
    [error_rate] = [a for a in watched.active_alerts() if a.kind == pb.ALERT_KIND_HIGH_ERROR_RATE]
    assert error_rate.value == 2 / 15 and error_rate.threshold == 0.1
    # Each says what to do: nothing in the window explains them, so each gets the advice for its kind.
    advice = {pb.AlertKind.Name(a.kind): a.recommendation for a in watched.active_alerts()}
    assert advice["ALERT_KIND_HIGH_ERROR_RATE"].title == "Calls to execute fail"
    assert advice["ALERT_KIND_HIGH_ERROR_RATE"].estimated_impact.value == 2 / 15
    assert advice["ALERT_KIND_HIGH_MEMORY_USAGE"].effort == pb.RECOMMENDATION_EFFORT_LOW
    assert advice["ALERT_KIND_HIGH_MEMORY_USAGE"].estimated_impact.unit == pb.IMPACT_UNIT_BYTES
    assert advice["ALERT_KIND_HIGH_MEMORY_USAGE"].estimated_impact.value == 100 * 2**20
    assert "about 100 MiB less memory" in advice["ALERT_KIND_HIGH_MEMORY_USAGE"].estimated_impact.summary
    assert advice["ALERT_KIND_LOW_THROUGHPUT"].estimated_impact.unit == pb.IMPACT_UNIT_CALLS_PER_SECOND
    script.calls(30, 0.01)
    script.rss = 60 * 2**20
    await watched.check()
    assert kinds(watched) == set()


async def test_regressions_are_judged_against_the_rolling_baseline() -> None:
    script = Script()
    watched = monitor(script)
    await watched.check()
    for _ in range(4):  # the baseline: 40 calls a second at 10 ms
        script.calls(40, 0.010)
        await watched.check()
    assert kinds(watched) == set()
    script.calls(40, 0.015)  # 50 % slower
    await watched.check()
    assert kinds(watched) == {"LATENCY_REGRESSION"}
    script.calls(10, 0.010)  # a quarter of the calls: throughput down by 75 %
    await watched.check()
    assert kinds(watched) == {"THROUGHPUT_REGRESSION"}


async def test_alerts_reach_watchers_raised_and_resolved() -> None:
    script = Script()
    watched = monitor(script, response_time_seconds=0.5)
    stream = watched.alerts()
    await watched.check()
    script.calls(3, 1.0)
    waiting = anext(stream)
    await watched.check()
    raised = await waiting
    assert raised.kind == pb.ALERT_KIND_HIGH_RESPONSE_TIME and raised.method == METHOD
    await watched.check()
    resolved = await anext(stream)
    assert resolved.id == raised.id and resolved.HasField("resolve_time")
    await stream.aclose()


def stats(seconds: float, count: int = 30) -> pb.LatencyStats:
    histogram = LatencyHistogram()
    for _ in range(count):
        histogram.record(seconds)
    return histogram.stats()


def recent(*tiers: pb.TierMetrics) -> list[Recent]:
    return [Recent(metrics=tier, seconds=300.0) for tier in tiers]


def test_recommendations_come_by_priority_then_impact_with_their_evidence_impact_and_effort() -> None:
    coordinate = pb.TierMetrics(tier=common_pb2.TIER_COORDINATE)
    coordinate.coordinate.model.latency.CopyFrom(stats(6.0))
    coordinate.coordinate.decomposition_latency["model"].CopyFrom(stats(4.0))
    orchestrate = pb.TierMetrics(tier=common_pb2.TIER_ORCHESTRATE)
    orchestrate.orchestrate.plan_cache_hits, orchestrate.orchestrate.plan_cache_misses = 5, 25
    execute = pb.TierMetrics(tier=common_pb2.TIER_EXECUTE)
    execute.execute.tools.add(name="fast", latency=stats(0.01))
    execute.execute.tools.add(name="slow", latency=stats(2.0))  # half its p95 above 1 s: more than decomposition
    advice = recommend(recent(orchestrate, execute, coordinate))
    assert [(a.priority, a.metric, a.effort) for a in advice] == [
        (pb.RECOMMENDATION_PRIORITY_HIGH, "coordinate.model.latency.p95", pb.RECOMMENDATION_EFFORT_HIGH),
        (pb.RECOMMENDATION_PRIORITY_MEDIUM, "execute.tools.slow.latency.p95", pb.RECOMMENDATION_EFFORT_MEDIUM),
        (
            pb.RECOMMENDATION_PRIORITY_MEDIUM,
            "coordinate.decomposition_latency.model.p95",
            pb.RECOMMENDATION_EFFORT_MEDIUM,
        ),
        (pb.RECOMMENDATION_PRIORITY_LOW, "orchestrate.plan_cache_hit_rate", pb.RECOMMENDATION_EFFORT_MEDIUM),
    ]
    model = advice[0]
    assert model.value >= 6.0 and model.threshold == 5.0
    assert model.estimated_impact.unit == pb.IMPACT_UNIT_SECONDS
    assert model.estimated_impact.value == model.value - 5.0
    assert model.estimated_impact.summary.startswith(f"about {model.value - 5.0:.2f} s off the p95 of 30 model calls")
    assert model.estimated_impact.summary.endswith("in the last 5 min")
    assert all(a.window.ToSeconds() == 300 for a in advice)
    plans = advice[3]
    assert plans.value == 5 / 30 and plans.estimated_impact.unit == pb.IMPACT_UNIT_SHARE
    assert plans.estimated_impact.value == 0.5 - 5 / 30


def test_every_alert_kind_says_what_to_do() -> None:
    kinds = set(pb.AlertKind.values()) - {pb.ALERT_KIND_UNSPECIFIED}
    assert set(ANSWERS) == kinds
    for kind in kinds:
        alert = pb.Alert(kind=kind, tier=common_pb2.TIER_EXECUTE, method=METHOD, value=3.0, threshold=2.0)
        advice = answer(alert, [], 5.0)
        assert advice.title and advice.action and advice.estimated_impact.summary, kind
        assert advice.priority != pb.RECOMMENDATION_PRIORITY_UNSPECIFIED, kind
        assert advice.effort != pb.RECOMMENDATION_EFFORT_UNSPECIFIED, kind
        assert advice.estimated_impact.unit != pb.IMPACT_UNIT_UNSPECIFIED, kind
        assert advice.window.ToSeconds() == 5 and (advice.value, advice.threshold) == (3.0, 2.0), kind
    slow = answer(pb.Alert(kind=pb.ALERT_KIND_HIGH_RESPONSE_TIME, method=METHOD, value=7.5, threshold=5.0), [], 5.0)
    assert slow.title == f"{METHOD} is slow" and slow.estimated_impact.value == 2.5


def test_a_slow_method_is_answered_by_the_advice_of_its_tier_or_the_tiers_it_calls() -> None:
    coordinate = pb.TierMetrics(tier=common_pb2.TIER_COORDINATE)
    coordinate.coordinate.model.latency.CopyFrom(stats(6.0))
    coordinate.coordinate.model.cache_lookups = 100  # no hits: LOW advice, not about latency
    execute = pb.TierMetrics(tier=common_pb2.TIER_EXECUTE)
    execute.execute.tools.add(name="http.request", latency=stats(3.0))
    advice = recommend(recent(coordinate, execute))

    def slow(tier: common_pb2.Tier.ValueType) -> pb.Alert:
        return pb.Alert(kind=pb.ALERT_KIND_HIGH_RESPONSE_TIME, tier=tier, method=METHOD, value=9.0, threshold=5.0)

    assert answer(slow(common_pb2.TIER_COORDINATE), advice, 5.0).title == "Model calls are slow"
    # Orchestrate and Execute do not call Coordinate's model: the tool they wait for explains them.
    assert answer(slow(common_pb2.TIER_ORCHESTRATE), advice, 5.0).title == "Tool http.request is slow"
    assert answer(slow(common_pb2.TIER_EXECUTE), advice, 5.0).title == "Tool http.request is slow"
    regression = pb.Alert(kind=pb.ALERT_KIND_LATENCY_REGRESSION, tier=common_pb2.TIER_EXECUTE, method=METHOD)
    assert answer(regression, advice, 5.0).title == "Tool http.request is slow"
    failing = pb.Alert(kind=pb.ALERT_KIND_HIGH_ERROR_RATE, tier=common_pb2.TIER_EXECUTE, value=0.5, threshold=0.05)
    assert answer(failing, advice, 5.0).title == "Calls to execute fail"
    assert answer(slow(common_pb2.TIER_EXECUTE), [], 5.0).title == f"{METHOD} is slow"


async def test_a_watcher_that_falls_behind_is_told_so() -> None:
    script = Script()
    watched = monitor(script, response_time_seconds=0.5)
    stream = watched.alerts()
    await watched.check()
    script.calls(3, 1.0)
    first = asyncio.ensure_future(anext(stream))
    await watched.check()
    assert (await first).kind == pb.ALERT_KIND_HIGH_RESPONSE_TIME
    for check in range(WATCHER_BACKLOG + 1):  # resolved and raised, over and over, with nobody reading
        if check % 2:
            script.calls(3, 1.0)
        await watched.check()
    with pytest.raises(ResourceExhaustedError):
        while True:
            await anext(stream)


async def test_a_failing_store_raises_an_alert_until_it_is_back() -> None:
    store = pb.OrchestrateMetrics()

    def snapshot(method_filter: str = "") -> pb.TierMetrics:
        return pb.TierMetrics(tier=common_pb2.TIER_ORCHESTRATE, orchestrate=store)

    watched = CrossTierMonitor(common_pb2.TIER_ORCHESTRATE, {})
    watched.attach(snapshot)
    await watched.check()
    assert kinds(watched) == set()
    store.store_failing, store.queued_events = True, 42
    store.store_write_age.CopyFrom(to_duration(12.0))
    await watched.check()
    [alert] = watched.active_alerts()
    assert alert.kind == pb.ALERT_KIND_STORE_UNAVAILABLE and alert.tier == common_pb2.TIER_ORCHESTRATE
    assert alert.value == 12.0 and "42 events wait" in alert.message
    store.store_failing = False
    await watched.check()
    assert kinds(watched) == set()
