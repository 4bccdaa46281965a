"""Recommendations from the tiers' recent metrics, prioritised by expected impact, each with its evidence,
its estimated impact and the effort it asks for; and the recommendation that answers each alert."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from tierstack.core.values import to_duration, to_seconds
from tierstack.server.window import Recent
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb


@dataclass(frozen=True, kw_only=True)
class AdviceThresholds:
    """When advice is given.

    Attributes:
        model_seconds: Model calls slower than this (p95) call for caching or a faster model.
        decomposition_seconds: Decompositions slower than this (p95) call for templates.
        tool_seconds: Tools slower than this (p95) are named.
        cache_hit_rate: A model cache hit rate below this (over enough lookups) is worth a look.
        flush_seconds: Event-log batches slower than this (p95) mean persistence lags.
        min_samples: Fewer observations than this say nothing.
        window_seconds: How far back advice looks: what the tiers did before is forgotten.
    """

    model_seconds: float = 5.0
    decomposition_seconds: float = 3.0
    tool_seconds: float = 1.0
    cache_hit_rate: float = 0.2
    flush_seconds: float = 0.05
    min_samples: int = 20
    window_seconds: float = 300.0


DEFAULT_ADVICE = AdviceThresholds()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Advice:
    """What one recommendation says; ``{names}`` in its texts are filled in when it is given."""

    priority: pb.RecommendationPriority.ValueType
    effort: pb.RecommendationEffort.ValueType
    title: str
    action: str

    def give(
        self,
        tier: common_pb2.Tier.ValueType,
        metric: str,
        value: float,
        threshold: float,
        impact: pb.Impact,
        window: float,
        /,
        **names: str,
    ) -> pb.Recommendation:
        return pb.Recommendation(
            priority=self.priority,
            tier=tier,
            title=self.title.format(**names),
            action=self.action.format(**names),
            metric=metric,
            value=value,
            threshold=threshold,
            estimated_impact=impact,
            effort=self.effort,
            window=to_duration(window),
        )


SLOW_MODEL = _Advice(
    priority=pb.RECOMMENDATION_PRIORITY_HIGH,
    effort=pb.RECOMMENDATION_EFFORT_HIGH,
    title="Model calls are slow",
    action="Use a faster model (TIERSTACK_MODEL, TIERSTACK_MODEL_FALLBACKS), or cache its answers: keep prompts "
    "deterministic (temperature 0) so they can be cached, and share the cache between servers with "
    "TIERSTACK_REDIS_URL.",
)
FEW_CACHE_HITS = _Advice(
    priority=pb.RECOMMENDATION_PRIORITY_LOW,
    effort=pb.RECOMMENDATION_EFFORT_LOW,
    title="Few model answers come from the cache",
    action="Repeated questions are cached only when they are identical and at temperature 0; share the cache "
    "between servers with TIERSTACK_REDIS_URL and raise TIERSTACK_MODEL_CACHE_ENTRIES.",
)
SLOW_DECOMPOSITION = _Advice(
    priority=pb.RECOMMENDATION_PRIORITY_MEDIUM,
    effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
    title="Goal decomposition is slow",
    action="Add goal templates (TIERSTACK_TEMPLATES_DIR) for frequent goals; a goal that differs from one "
    "that succeeded in particulars alone (names, numbers, dates, URLs) reuses its plan without a model.",
)
SLOW_TOOL = _Advice(
    priority=pb.RECOMMENDATION_PRIORITY_MEDIUM,
    effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
    title="Tool {tool} is slow",
    action="Mark it pure if its result depends only on its arguments (results are then reused), give it a "
    "timeout, or run its calls in parallel with ExecuteTools.",
)
SLOW_FLUSH = _Advice(
    priority=pb.RECOMMENDATION_PRIORITY_MEDIUM,
    effort=pb.RECOMMENDATION_EFFORT_HIGH,
    title="Persisting run state lags",
    action="Put TIERSTACK_DATA_DIR on a faster disk; every step waits for its events to be stored before anyone "
    "sees them.",
)
PLANS_AFRESH = _Advice(
    priority=pb.RECOMMENDATION_PRIORITY_LOW,
    effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
    title="Most workflow plans are computed afresh",
    action="Plans are cached by the workflow's content: keep definitions stable and pass what changes between "
    "runs as inputs.",
)
#: The share of plans served from the plan cache below which its misses are worth a look.
PLAN_CACHE_HIT_RATE = 0.5


def _last(seconds: float) -> str:
    """Names a window for a person: "the last 5 min", "the last 40 s", "the last 0.3 s"."""
    return f"the last {seconds / 60:.0f} min" if seconds >= 120 else f"the last {seconds:.3g} s"


def _p95(stats: pb.LatencyStats) -> float:
    return to_seconds(stats.p95) or 0.0


# Each piece of advice comes with the share of its metric it would save, by which advice of one
# priority is ranked: the share of a latency it takes off, or the share of calls it saves.
_Ranked = tuple[pb.Recommendation, float]


def recommend(tiers: Iterable[Recent], thresholds: AdviceThresholds = DEFAULT_ADVICE) -> list[pb.Recommendation]:
    """Returns the advice the tiers' recent metrics call for, the highest priority first, then the largest
    estimated impact relative to what it improves; none for a window in which nothing happened."""
    found = [ranked for recent in tiers for ranked in _tier_advice(recent, thresholds)]
    found.sort(key=lambda pair: (pair[0].priority, -pair[1]))
    return [recommendation for recommendation, _ in found]


def _tier_advice(recent: Recent, limits: AdviceThresholds) -> Iterator[_Ranked]:
    metrics, window = recent.metrics, recent.seconds
    tier = metrics.tier
    prefix = common_pb2.Tier.Name(tier).removeprefix("TIER_").lower()

    def slow(
        advice: _Advice, stats: pb.LatencyStats, limit: float, metric: str, what: str, min_count: int = 1, **names: str
    ) -> Iterator[_Ranked]:
        p95 = _p95(stats)
        if stats.count >= min_count and p95 > limit:
            saved = p95 - limit
            summary = f"about {saved:.2f} s off the p95 of {stats.count} {what} in {_last(window)}"
            impact = pb.Impact(value=saved, unit=pb.IMPACT_UNIT_SECONDS, summary=summary)
            yield advice.give(tier, metric, p95, limit, impact, window, **names), saved / p95

    def too_few(advice: _Advice, hits: int, total: int, target: float, metric: str, what: str) -> Iterator[_Ranked]:
        share = hits / total if total else 0.0
        if total >= limits.min_samples and share < target:
            saved = (target - share) * total
            summary = f"about {saved:.0f} more of the {total} {what} in {_last(window)} answered from the cache"
            impact = pb.Impact(value=target - share, unit=pb.IMPACT_UNIT_SHARE, summary=summary)
            yield advice.give(tier, metric, share, target, impact, window), target - share

    domain = metrics.WhichOneof("domain")
    if domain in ("coordinate", "execute"):
        model = metrics.coordinate.model if domain == "coordinate" else metrics.execute.model
        yield from slow(SLOW_MODEL, model.latency, limits.model_seconds, f"{prefix}.model.latency.p95", "model calls")
        yield from too_few(
            FEW_CACHE_HITS,
            model.cache_hits,
            model.cache_lookups,
            limits.cache_hit_rate,
            f"{prefix}.model.cache_hit_rate",
            "cache lookups",
        )
    if domain == "coordinate":
        for source, stats in sorted(metrics.coordinate.decomposition_latency.items()):
            metric = f"coordinate.decomposition_latency.{source}.p95"
            yield from slow(
                SLOW_DECOMPOSITION, stats, limits.decomposition_seconds, metric, f"decompositions by {source}"
            )
    if domain == "execute":
        for tool in metrics.execute.tools:
            metric = f"execute.tools.{tool.name}.latency.p95"
            yield from slow(SLOW_TOOL, tool.latency, limits.tool_seconds, metric, "calls", tool=tool.name)
    if domain == "orchestrate":
        orchestrate = metrics.orchestrate
        yield from slow(
            SLOW_FLUSH,
            orchestrate.flush_latency,
            limits.flush_seconds,
            "orchestrate.flush_latency.p95",
            "event-log batches",
            limits.min_samples,
        )
        yield from too_few(
            PLANS_AFRESH,
            orchestrate.plan_cache_hits,
            orchestrate.plan_cache_hits + orchestrate.plan_cache_misses,
            PLAN_CACHE_HIT_RATE,
            "orchestrate.plan_cache_hit_rate",
            "plans",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Answer:
    """The advice for one kind of alert, when no advice of the window explains it."""

    advice: _Advice
    metric: str
    unit: pb.ImpactUnit.ValueType
    gain: Callable[[pb.Alert], float]
    summary: str  # formatted with the alert's tier and method and the gain


_FIND_THE_TIME = (
    "Find where its time goes: `tierstack top` shows each tier's methods and its calls to the tier below, and "
    "a trace (OTEL_EXPORTER_OTLP_ENDPOINT) shows one call's steps, tools and model calls."
)
_FIND_THE_WAIT = (
    "If callers send less, nothing is wrong; otherwise calls wait: look at the calls in flight and the queued "
    "steps in `tierstack top`, and at the limits TIERSTACK_MAX_CONCURRENT_TOOLS and "
    "TIERSTACK_TENANT_REQUESTS_PER_SECOND."
)
ANSWERS: dict[pb.AlertKind.ValueType, _Answer] = {
    pb.ALERT_KIND_HIGH_RESPONSE_TIME: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_HIGH,
            effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
            title="{method} is slow",
            action=_FIND_THE_TIME,
        ),
        metric="{tier}.methods.{method}.latency.p95",
        unit=pb.IMPACT_UNIT_SECONDS,
        gain=lambda alert: alert.value - alert.threshold,
        summary="about {gain:.2f} s off the p95 of {method}, down to the threshold",
    ),
    pb.ALERT_KIND_LATENCY_REGRESSION: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_MEDIUM,
            effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
            title="{method} got slower",
            action="Look for what changed (a release, a model, a tool, the load). " + _FIND_THE_TIME,
        ),
        metric="{tier}.methods.{method}.latency.p95",
        unit=pb.IMPACT_UNIT_SECONDS,
        gain=lambda alert: alert.value - alert.threshold,
        summary="about {gain:.2f} s off the p95 of {method}, back to its baseline",
    ),
    pb.ALERT_KIND_HIGH_ERROR_RATE: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_HIGH,
            effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
            title="Calls to {tier} fail",
            action="See which methods fail with which status (counts by code in GetMetrics) and read {tier}'s log "
            "for those errors; an open circuit breaker in the model metrics names a model that is down.",
        ),
        metric="{tier}.error_rate",
        unit=pb.IMPACT_UNIT_SHARE,
        gain=lambda alert: alert.value,
        summary="about {gain:.0%} of {tier}'s calls succeed instead of failing",
    ),
    pb.ALERT_KIND_HIGH_MEMORY_USAGE: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_MEDIUM,
            effort=pb.RECOMMENDATION_EFFORT_LOW,
            title="{tier} uses too much memory",
            action="Keep fewer model answers in memory (TIERSTACK_MODEL_CACHE_ENTRIES; TIERSTACK_REDIS_URL shares a "
            "larger cache) and, on Coordinate, fewer learnt goals (TIERSTACK_GOAL_MEMORY_ENTRIES); or give the "
            "server more memory and raise TIERSTACK_ALERT_MEMORY_BYTES.",
        ),
        metric="{tier}.process.rss_bytes",
        unit=pb.IMPACT_UNIT_BYTES,
        gain=lambda alert: alert.value - alert.threshold,
        summary="about {gain_mib:.0f} MiB less memory, down to the threshold",
    ),
    pb.ALERT_KIND_LOW_THROUGHPUT: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_LOW,
            effort=pb.RECOMMENDATION_EFFORT_LOW,
            title="{tier} serves few calls",
            action=_FIND_THE_WAIT,
        ),
        metric="{tier}.calls_per_second",
        unit=pb.IMPACT_UNIT_CALLS_PER_SECOND,
        gain=lambda alert: alert.threshold - alert.value,
        summary="about {gain:.2f} more calls/s, up to the threshold",
    ),
    pb.ALERT_KIND_THROUGHPUT_REGRESSION: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_MEDIUM,
            effort=pb.RECOMMENDATION_EFFORT_LOW,
            title="{tier} serves fewer calls than before",
            action=_FIND_THE_WAIT,
        ),
        metric="{tier}.calls_per_second",
        unit=pb.IMPACT_UNIT_CALLS_PER_SECOND,
        gain=lambda alert: alert.threshold - alert.value,
        summary="about {gain:.1f} more calls/s, back to its baseline",
    ),
    pb.ALERT_KIND_STORE_UNAVAILABLE: _Answer(
        advice=_Advice(
            priority=pb.RECOMMENDATION_PRIORITY_HIGH,
            effort=pb.RECOMMENDATION_EFFORT_MEDIUM,
            title="{tier} cannot write to its store",
            action="Make the store writable again: free space on the disk of TIERSTACK_DATA_DIR or fix its "
            "permissions, or bring back the PostgreSQL server of TIERSTACK_STORE_URL; the waiting events are "
            "stored as soon as it is, and new steps start again.",
        ),
        metric="{tier}.store_write_age",
        unit=pb.IMPACT_UNIT_SECONDS,
        gain=lambda alert: alert.value,
        summary="stores the run state of the last {gain:.0f} s, which waits in memory",
    ),
}
#: The alerts about a slow method, which the latency advice of its tier or of the tiers below explains.
_SLOW_METHOD = frozenset({pb.ALERT_KIND_HIGH_RESPONSE_TIME, pb.ALERT_KIND_LATENCY_REGRESSION})


def answer(alert: pb.Alert, advice: Sequence[pb.Recommendation], window: float) -> pb.Recommendation:
    """Returns what to do about ``alert``.

    Args:
        alert: The alert.
        advice: The recommendations of the recent window, in their order.
        window: The span the alert was judged on, in seconds.

    Returns:
        For a slow method, the first advice that takes time off a latency of its tier or of a tier it
        calls (those below it); else the advice for the alert's kind, judged on the alert's own window.
    """
    if alert.kind in _SLOW_METHOD:
        for recommendation in advice:
            below = recommendation.tier >= alert.tier  # Coordinate calls Orchestrate, which calls Execute
            if below and recommendation.estimated_impact.unit == pb.IMPACT_UNIT_SECONDS:
                return recommendation
    kind = ANSWERS[alert.kind]
    gain = kind.gain(alert)
    names = {"tier": common_pb2.Tier.Name(alert.tier).removeprefix("TIER_").lower(), "method": alert.method}
    summary = kind.summary.format(gain=gain, gain_mib=gain / 2**20, **names)
    impact = pb.Impact(value=gain, unit=kind.unit, summary=summary)
    metric = kind.metric.format(**names)
    return kind.advice.give(alert.tier, metric, alert.value, alert.threshold, impact, window, **names)
