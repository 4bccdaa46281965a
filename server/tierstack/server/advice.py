"""Recommendations from the tiers' metrics, prioritised by expected impact, each with its evidence."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tierstack.core.values import to_seconds
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb


@dataclass(frozen=True, kw_only=True)
class AdviceThresholds:
    """When advice is given.

    Attributes:
        model_seconds: Model calls slower than this (p95) call for caching or a faster model.
        decomposition_seconds: Decompositions slower than this (p95) call for templates.
        tool_seconds: Tools slower than this (p95) are named.
        cache_hit_rate: A model cache hit rate below this (over enough requests) is worth a look.
        flush_seconds: Event-log batches slower than this (p95) mean persistence lags.
        min_samples: Fewer observations than this say nothing.
    """

    model_seconds: float = 5.0
    decomposition_seconds: float = 3.0
    tool_seconds: float = 1.0
    cache_hit_rate: float = 0.2
    flush_seconds: float = 0.05
    min_samples: int = 20


DEFAULT_ADVICE = AdviceThresholds()


def _p95(stats: pb.LatencyStats) -> float:
    return to_seconds(stats.p95) or 0.0


def recommend(
    tiers: Iterable[pb.TierMetrics], thresholds: AdviceThresholds = DEFAULT_ADVICE
) -> list[pb.Recommendation]:
    """Returns the advice the metrics call for, highest priority first, then by how far each value is
    past its threshold."""
    limits = thresholds
    found: list[tuple[pb.Recommendation, float]] = []  # with how many times past its threshold it is

    def advise(
        priority: pb.RecommendationPriority.ValueType,
        tier: common_pb2.Tier.ValueType,
        title: str,
        action: str,
        metric: str,
        value: float,
        threshold: float,
        *,
        too_low: bool = False,
    ) -> None:
        past = threshold / max(value, 1e-9) if too_low else value / threshold
        found.append(
            (
                pb.Recommendation(
                    priority=priority,
                    tier=tier,
                    title=title,
                    action=action,
                    metric=metric,
                    value=value,
                    threshold=threshold,
                ),
                past,
            )
        )

    for metrics in tiers:
        tier = metrics.tier
        prefix = common_pb2.Tier.Name(tier).removeprefix("TIER_").lower()
        domain = metrics.WhichOneof("domain")
        model = metrics.coordinate.model if domain == "coordinate" else metrics.execute.model
        if domain in ("coordinate", "execute"):
            if model.latency.count and _p95(model.latency) > limits.model_seconds:
                advise(
                    pb.RECOMMENDATION_PRIORITY_HIGH,
                    tier,
                    "Model calls are slow",
                    "Cache model responses (TIERSTACK_REDIS_URL shares them between servers), keep prompts "
                    "deterministic (temperature 0) so they can be cached, or use a faster model "
                    "(TIERSTACK_MODEL, TIERSTACK_MODEL_FALLBACKS).",
                    f"{prefix}.model.latency.p95",
                    _p95(model.latency),
                    limits.model_seconds,
                )
            lookups = model.requests
            if lookups >= limits.min_samples and model.cache_hit_rate < limits.cache_hit_rate:
                advise(
                    pb.RECOMMENDATION_PRIORITY_LOW,
                    tier,
                    "Few model answers come from the cache",
                    "Repeated questions are cached only when they are identical and at temperature 0; share the "
                    "cache between servers with TIERSTACK_REDIS_URL and raise TIERSTACK_MODEL_CACHE_ENTRIES.",
                    f"{prefix}.model.cache_hit_rate",
                    model.cache_hit_rate,
                    limits.cache_hit_rate,
                    too_low=True,
                )
        if domain == "coordinate":
            for source, stats in sorted(metrics.coordinate.decomposition_latency.items()):
                if stats.count and _p95(stats) > limits.decomposition_seconds:
                    advise(
                        pb.RECOMMENDATION_PRIORITY_MEDIUM,
                        tier,
                        "Goal decomposition is slow",
                        "Add goal templates (TIERSTACK_TEMPLATES_DIR) for frequent goals, or lower "
                        "TIERSTACK_SIMILARITY_THRESHOLD so that similar past goals are reused.",
                        f"coordinate.decomposition_latency.{source}.p95",
                        _p95(stats),
                        limits.decomposition_seconds,
                    )
        if domain == "execute":
            for tool in metrics.execute.tools:
                if tool.latency.count and _p95(tool.latency) > limits.tool_seconds:
                    advise(
                        pb.RECOMMENDATION_PRIORITY_MEDIUM,
                        tier,
                        f"Tool {tool.name} is slow",
                        "Mark it pure if its result depends only on its arguments (results are then reused), "
                        "give it a timeout, or run its calls in parallel with ExecuteTools.",
                        f"execute.tools.{tool.name}.latency.p95",
                        _p95(tool.latency),
                        limits.tool_seconds,
                    )
        if domain == "orchestrate":
            orchestrate = metrics.orchestrate
            flush = orchestrate.flush_latency
            if flush.count >= limits.min_samples and _p95(flush) > limits.flush_seconds:
                advise(
                    pb.RECOMMENDATION_PRIORITY_MEDIUM,
                    tier,
                    "Persisting run state lags",
                    "Put TIERSTACK_DATA_DIR on a faster disk; every step waits for its events to be stored "
                    "before anyone sees them.",
                    "orchestrate.flush_latency.p95",
                    _p95(flush),
                    limits.flush_seconds,
                )
            plans = orchestrate.plan_cache_hits + orchestrate.plan_cache_misses
            if plans >= limits.min_samples and orchestrate.plan_cache_misses > orchestrate.plan_cache_hits:
                share = orchestrate.plan_cache_hits / plans
                advise(
                    pb.RECOMMENDATION_PRIORITY_LOW,
                    tier,
                    "Most workflow plans are computed afresh",
                    "Plans are cached by the workflow's content: keep definitions stable and pass what "
                    "changes between runs as inputs.",
                    "orchestrate.plan_cache_hit_rate",
                    share,
                    0.5,
                    too_low=True,
                )

    found.sort(key=lambda pair: (pair[0].priority, -pair[1]))
    return [recommendation for recommendation, _ in found]
