"""Advice judged on a recent window: the tier's own uptime is the clock, snapshots are scripted, and
the advice given at each moment covers only the window before it."""

from __future__ import annotations

from tierstack.core.values import to_duration
from tierstack.server.advice import AdviceThresholds, recommend
from tierstack.server.metrics import LatencyHistogram
from tierstack.server.window import SLOTS, History, Recent
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb

WINDOW = 300.0


class Coordinate:
    """Coordinate's model calls, made up by the test at a time it chooses."""

    def __init__(self) -> None:
        self.model = LatencyHistogram()
        self.cache_hits = 0
        self.cache_lookups = 0

    def calls(self, count: int, seconds: float) -> None:
        for _ in range(count):
            self.model.record(seconds)

    def snapshot(self, uptime: float) -> pb.TierMetrics:
        """Returns the metrics since the start, as ``GetMetrics`` reports them, ``uptime`` seconds in."""
        metrics = pb.TierMetrics(tier=common_pb2.TIER_COORDINATE, process=pb.ProcessMetrics(uptime=to_duration(uptime)))
        metrics.coordinate.model.CopyFrom(
            pb.ModelMetrics(
                requests=self.model.count,
                cache_hits=self.cache_hits,
                cache_lookups=self.cache_lookups,
                latency=self.model.stats(),
            )
        )
        return metrics


def titles(recent: Recent) -> list[str]:
    return [advice.title for advice in recommend([recent], AdviceThresholds(window_seconds=WINDOW))]


def run(tier: Coordinate, history: History, start: float, end: float) -> None:
    """Lets the monitor take a snapshot every 5 s of the tier's uptime from ``start`` to ``end``."""
    for second in range(int(start), int(end), 5):
        history.add(tier.snapshot(second))


def test_an_incident_stops_calling_for_advice_once_the_window_has_passed() -> None:
    tier, history = Coordinate(), History(WINDOW)
    run(tier, history, 0, 600)
    tier.calls(30, 8.0)  # slow model calls at 600 s
    run(tier, history, 600, 700)
    recent = history.recent(tier.snapshot(700))
    assert titles(recent) == ["Model calls are slow"]
    assert recent.seconds <= WINDOW and recent.metrics.coordinate.model.requests == 30
    run(tier, history, 700, 1000)
    quiet = history.recent(tier.snapshot(1000))
    assert titles(quiet) == [] and quiet.metrics.coordinate.model.latency.count == 0
    # GetMetrics keeps counting since the start: only the advice forgets.
    assert tier.snapshot(1000).coordinate.model.latency.count == 30


def test_a_fresh_problem_is_not_diluted_by_the_servers_whole_life() -> None:
    tier, history = Coordinate(), History(WINDOW)
    for second in range(0, 3600, 5):
        tier.calls(2, 0.5)  # an hour of fast calls
        history.add(tier.snapshot(second))
    tier.calls(40, 9.0)  # then the model slows down
    current = tier.snapshot(3600)
    since_start = Recent(metrics=current, seconds=3600)
    assert titles(since_start) == []  # 40 slow calls among 1,480: the p95 is fast
    recent = history.recent(current)
    assert titles(recent) == ["Model calls are slow"]
    [advice] = recommend([recent])
    assert advice.value >= 9.0 and advice.estimated_impact.unit == pb.IMPACT_UNIT_SECONDS
    assert WINDOW - WINDOW / SLOTS <= advice.window.ToNanoseconds() / 1e9 <= WINDOW


def test_a_young_tier_is_judged_since_its_start_and_a_restarted_one_since_its_restart() -> None:
    tier, history = Coordinate(), History(WINDOW)
    tier.calls(30, 8.0)
    run(tier, history, 0, 60)
    recent = history.recent(tier.snapshot(60))
    assert titles(recent) == ["Model calls are slow"] and recent.seconds == 60
    run(tier, history, 60, 900)
    assert titles(history.recent(tier.snapshot(900))) == []
    restarted = Coordinate()
    restarted.calls(30, 6.0)
    recent = history.recent(restarted.snapshot(30))  # its uptime went back: a new process
    assert titles(recent) == ["Model calls are slow"] and recent.seconds == 30
    assert recent.metrics.coordinate.model.requests == 30
    run(restarted, history, 30, 400)
    assert titles(history.recent(restarted.snapshot(400))) == []
    assert history.recent(restarted.snapshot(400)).seconds <= WINDOW


def test_the_cache_hit_rate_is_that_of_the_window() -> None:
    tier, history = Coordinate(), History(WINDOW)
    tier.cache_hits, tier.cache_lookups = 900, 1000  # a good hour
    run(tier, history, 0, 3600)
    tier.cache_lookups += 100  # then nothing comes from the cache
    recent = history.recent(tier.snapshot(3600))
    assert recent.metrics.coordinate.model.cache_hit_rate == 0.0
    [advice] = recommend([recent])
    assert advice.title == "Few model answers come from the cache"
    assert advice.effort == pb.RECOMMENDATION_EFFORT_LOW
    assert advice.estimated_impact.unit == pb.IMPACT_UNIT_SHARE and advice.estimated_impact.value == 0.2
    assert "about 20 more of the 100 cache lookups in the last 5 min" in advice.estimated_impact.summary


def test_the_history_keeps_a_few_snapshots_however_long_the_tier_runs() -> None:
    tier, history = Coordinate(), History(WINDOW)
    for second in range(10_000):
        tier.calls(1, 0.01)
        history.add(tier.snapshot(second))
        assert len(history._snapshots) <= SLOTS + 2  # the window's slots and the one before it


def test_a_restart_seen_only_after_longer_than_its_old_uptime_is_told_by_its_counters() -> None:
    """The monitor lost sight of the tier for a while: it came back restarted, with an uptime past the
    old process's, and counts from nothing again."""
    tier, history = Coordinate(), History(WINDOW)
    tier.calls(50, 0.1)
    run(tier, history, 0, 600)
    restarted = Coordinate()
    restarted.calls(30, 8.0)  # the new process's calls, all slow
    recent = history.recent(restarted.snapshot(650))
    assert recent.metrics.coordinate.model.requests == 30  # not 30 - 50
    assert titles(recent) == ["Model calls are slow"]
    history.add(restarted.snapshot(650))  # the old process's snapshots are forgotten
    restarted.calls(5, 8.0)
    later = history.recent(restarted.snapshot(700))
    assert (later.metrics.coordinate.model.requests, later.seconds) == (5, 50)
