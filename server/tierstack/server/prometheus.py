"""Prometheus exposition: each server serves its tier's metrics at ``/metrics`` on a port of its own.

A scrape asks the event loop for a snapshot (the same ``TierMetrics`` ``GetMetrics`` returns) and
translates it, so nothing is recorded twice and the scrape thread never reads what the loop writes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tierstack.core.values import to_seconds
from tierstack.server.metrics import LatencyHistogram
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as pb

#: The upper bounds of the exported latency buckets, in seconds.
BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
#: How long a scrape waits for the event loop's snapshot, in seconds.
SNAPSHOT_TIMEOUT = 5.0


class _Histograms:
    """One histogram family whose series come from ``LatencyStats`` messages."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.family = HistogramMetricFamily(name, documentation, labels=labels)

    def add(self, labels: list[str], stats: pb.LatencyStats) -> None:
        histogram = LatencyHistogram.from_stats(stats)
        counts = histogram.cumulative(BUCKETS)
        buckets = [(f"{bound:g}", count) for bound, count in zip(BUCKETS, counts, strict=True)]
        buckets.append(("+Inf", histogram.count))
        self.family.add_metric(labels, buckets, histogram.total)


def _family(
    kind: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: list[str],
    values: Mapping[tuple[str, ...], float],
) -> Any:
    family = kind(name, documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


_counter = functools.partial(_family, CounterMetricFamily)
_gauge = functools.partial(_family, GaugeMetricFamily)


def families(metrics: pb.TierMetrics) -> Iterator[Any]:
    """Yields the Prometheus metric families of one tier's metrics."""
    tier = common_pb2.Tier.Name(metrics.tier).removeprefix("TIER_").lower()
    for side, methods in (("rpc", metrics.methods), ("client_rpc", metrics.client_methods)):
        durations = _Histograms(
            f"tierstack_{side}_duration_seconds",
            "How long RPCs took, by method and status code (streams to their end)"
            + (", seen by the caller in this tier" if side == "client_rpc" else ""),
            ["tier", "method", "code"],
        )
        for method in methods:
            for code, stats in sorted(method.latency_by_code.items()):
                durations.add([tier, method.method, code], stats)
        yield durations.family
        yield _gauge(
            f"tierstack_{side}_in_flight",
            "RPCs in flight",
            ["tier", "method"],
            {(tier, m.method): m.in_flight for m in methods},
        )
        yield _counter(
            f"tierstack_{side}_stream_messages",
            "Messages of server-streaming RPCs",
            ["tier", "method"],
            {(tier, m.method): m.stream_messages for m in methods if m.stream_messages},
        )
    process = metrics.process
    yield _gauge("tierstack_process_resident_memory_bytes", "Resident memory", ["tier"], {(tier,): process.rss_bytes})
    yield _counter(
        "tierstack_process_cpu_seconds",
        "CPU time, user and system",
        ["tier"],
        {(tier,): to_seconds(process.cpu_time) or 0.0},
    )
    domain = metrics.WhichOneof("domain")
    if domain == "execute":
        yield from _execute(tier, metrics.execute)
    elif domain == "orchestrate":
        yield from _orchestrate(tier, metrics.orchestrate)
    elif domain == "coordinate":
        yield from _model(tier, metrics.coordinate.model)
        decomposition = _Histograms(
            "tierstack_decomposition_duration_seconds", "How long goal decomposition took", ["tier", "source"]
        )
        for source, stats in sorted(metrics.coordinate.decomposition_latency.items()):
            decomposition.add([tier, source], stats)
        yield decomposition.family
        team = _Histograms("tierstack_team_formation_duration_seconds", "How long team formation took", ["tier"])
        team.add([tier], metrics.coordinate.team_formation_latency)
        yield team.family
        yield _gauge(
            "tierstack_active_goals", "Goals being pursued", ["tier"], {(tier,): metrics.coordinate.active_goals}
        )


def _model(tier: str, model: pb.ModelMetrics) -> Iterator[Any]:
    yield _counter("tierstack_model_requests", "Requests to the AI service", ["tier"], {(tier,): model.requests})
    yield _counter(
        "tierstack_model_cache_hits", "Requests answered from the model cache", ["tier"], {(tier,): model.cache_hits}
    )
    yield _counter(
        "tierstack_model_tokens",
        "Model tokens paid for",
        ["tier", "kind"],
        {(tier, "prompt"): model.prompt_tokens, (tier, "completion"): model.completion_tokens},
    )
    yield _counter("tierstack_model_cost_credits", "Cost of model calls", ["tier"], {(tier,): model.cost})
    latency = _Histograms("tierstack_model_duration_seconds", "How long model calls took", ["tier"])
    latency.add([tier], model.latency)
    yield latency.family


def _execute(tier: str, execute: pb.ExecuteMetrics) -> Iterator[Any]:
    tools = _Histograms("tierstack_tool_duration_seconds", "How long tool calls took", ["tier", "tool"])
    for tool in execute.tools:
        tools.add([tier, tool.name], tool.latency)
    yield tools.family
    yield _counter(
        "tierstack_tool_failures",
        "Tool calls that failed",
        ["tier", "tool"],
        {(tier, t.name): t.failures for t in execute.tools},
    )
    yield _counter(
        "tierstack_strategy_steps",
        "Steps run, by strategy",
        ["tier", "strategy"],
        {(tier, name): count for name, count in execute.strategy_usage.items()},
    )
    yield _counter(
        "tierstack_result_cache_lookups",
        "Pure tool calls looked up in the result cache",
        ["tier", "result"],
        {(tier, "hit"): execute.result_cache_hits, (tier, "miss"): execute.result_cache_misses},
    )
    yield from _model(tier, execute.model)


def _orchestrate(tier: str, orchestrate: pb.OrchestrateMetrics) -> Iterator[Any]:
    yield _gauge(
        "tierstack_runs",
        "Runs by state: those executing and those finished since the server started",
        ["tier", "state"],
        {(tier, state): count for state, count in orchestrate.runs_by_state.items()},
    )
    steps = _Histograms("tierstack_step_duration_seconds", "How long steps took", ["tier"])
    steps.add([tier], orchestrate.step_latency)
    yield steps.family
    yield _gauge(
        "tierstack_context_operations_per_second",
        "Run-context operations per second over the last 10 s",
        ["tier"],
        {(tier,): orchestrate.context_operations_per_second},
    )
    yield _gauge(
        "tierstack_step_queue_depth", "Steps waiting for a free slot", ["tier"], {(tier,): orchestrate.queue_depth}
    )
    flush = _Histograms("tierstack_event_flush_duration_seconds", "How long storing a batch of events took", ["tier"])
    flush.add([tier], orchestrate.flush_latency)
    yield flush.family
    yield _gauge(
        "tierstack_event_flush_batch_size_mean",
        "Mean events per stored batch",
        ["tier"],
        {(tier,): orchestrate.mean_flush_batch_size},
    )
    yield _gauge(
        "tierstack_store_failing",
        "1 while writes to the run store fail",
        ["tier"],
        {(tier,): orchestrate.store_failing},
    )
    yield _counter(
        "tierstack_store_write_failures",
        "Failed writes to the run store",
        ["tier"],
        {(tier,): orchestrate.store_write_failures},
    )
    yield _gauge(
        "tierstack_store_write_age_seconds",
        "Seconds since a batch of events was last stored",
        ["tier"],
        {(tier,): to_seconds(orchestrate.store_write_age) or 0.0},
    )
    yield _gauge(
        "tierstack_queued_events", "Events waiting to be stored", ["tier"], {(tier,): orchestrate.queued_events}
    )
    yield _counter(
        "tierstack_plan_cache_lookups",
        "Workflow plans looked up in the plan cache",
        ["tier", "result"],
        {(tier, "hit"): orchestrate.plan_cache_hits, (tier, "miss"): orchestrate.plan_cache_misses},
    )


class _TierCollector(Collector):
    """Collects a tier's metrics from its event loop at each scrape."""

    def __init__(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], pb.TierMetrics]) -> None:
        self._loop = loop
        self._snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        async def take() -> pb.TierMetrics:
            return self._snapshot()

        metrics = asyncio.run_coroutine_threadsafe(take(), self._loop).result(SNAPSHOT_TIMEOUT)
        return list(families(metrics))


class MetricsEndpoint:
    """Serves ``/metrics`` in a thread of its own (prometheus_client's server).

    Args:
        snapshot: Returns the tier's metrics; called in the event loop that creates the endpoint.
    """

    def __init__(self, snapshot: Callable[[], pb.TierMetrics]) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_TierCollector(asyncio.get_running_loop(), snapshot))
        self._server: Any = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        """Starts serving and returns the bound port (``port`` 0 picks a free one).

        Raises:
            OSError: The port cannot be bound.
        """
        self._server, _ = start_http_server(port, host, registry=self._registry)
        self.port = self._server.server_port
        return self.port

    async def stop(self) -> None:
        """Stops serving (off the event loop: a scrape in progress may be waiting for it)."""
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
