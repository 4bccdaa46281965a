"""The monitor through the SDK: each tier's metrics, Coordinate's view of all three, alerts raised and
resolved, and recommendations with their evidence."""

from __future__ import annotations

import asyncio
import contextlib
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.helpers import HttpServer, Stack, open_stack, reply
from tierstack.client import FailedPreconditionError, InvalidArgumentError, MonitorClient
from tierstack.core.values import to_struct
from tierstack.server import Settings
from tierstack.server.crosstier import Thresholds
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import monitor_service_pb2 as pb

EXECUTE, ORCHESTRATE, COORDINATE = common_pb2.TIER_EXECUTE, common_pb2.TIER_ORCHESTRATE, common_pb2.TIER_COORDINATE
AGENTS = [coordinator_pb.Agent(id="w", capabilities=["writing", "analysis", "http"], max_concurrent_tasks=4)]


async def test_coordinate_reports_every_tier_with_its_domain_metrics(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/a"] = reply(b'{"n": 1}')
    goal = f"fetch {http_server.url}/a then analyze it, then write a report"
    request = coordinator_pb.CoordinateRequest(goal=goal, agents=AGENTS)
    for _ in range(2):
        events = [e async for e in stack.coordinator.coordinate(request)]
        assert events[-1].HasField("goal_completed")
    async with MonitorClient(stack.coordinate.target) as monitor:
        response = await monitor.get_metrics(tiers=[COORDINATE, ORCHESTRATE, EXECUTE])
    coordinate, orchestrate, execute = response.tiers
    assert [t.tier for t in response.tiers] == [COORDINATE, ORCHESTRATE, EXECUTE]
    assert all(t.process.rss_bytes > 0 and not t.HasField("error") for t in response.tiers)
    # Coordinate: decomposition by source (the second goal reused the first), team formation, goals.
    assert {k: v.count for k, v in coordinate.coordinate.decomposition_latency.items()} == {
        "model": 1,
        "similar_goal": 1,
    }
    assert coordinate.coordinate.team_formation_latency.count == 2
    # Its calls to Orchestrate, seen from its side: one start and one watch stream per subtask run.
    [started] = [m for m in coordinate.client_methods if m.method.endswith("/StartRun")]
    assert started.counts_by_code["OK"] == 6
    [orchestrate_calls] = [m for m in coordinate.client_methods if m.method.endswith("/WatchRun")]
    assert orchestrate_calls.counts_by_code["OK"] == 6 and orchestrate_calls.stream_messages > 6
    served = next(m for m in orchestrate.methods if m.method.endswith("/WatchRun"))
    assert served.latency.count == 6
    # The hop's own time: the caller waited at least as long as the callee worked, call for call.
    assert orchestrate_calls.latency.histogram.sum_seconds >= served.latency.histogram.sum_seconds
    assert orchestrate.orchestrate.runs_by_state["RUN_STATE_COMPLETED"] == 6
    assert orchestrate.orchestrate.step_latency.count == 6
    assert orchestrate.orchestrate.flush_latency.count > 0 and orchestrate.orchestrate.mean_flush_batch_size > 0
    assert orchestrate.orchestrate.context_operations_per_second > 0  # the report reads the analysis
    assert {t.name for t in execute.execute.tools} == {"http.request", "text.template"}
    assert execute.execute.strategy_usage["deterministic"] == 6


async def test_other_servers_report_only_themselves(stack: Stack) -> None:
    async with MonitorClient(stack.execute.target) as monitor:
        with pytest.raises(InvalidArgumentError) as caught:
            await monitor.get_metrics(tiers=[EXECUTE, COORDINATE])
        assert [v.field for v in caught.value.violations] == ["tiers[1]"]
        with pytest.raises(FailedPreconditionError):
            await monitor.get_recommendations()
        first = await anext(aiter(monitor.watch_metrics(0.1)))
        assert [t.tier for t in first.tiers] == [EXECUTE]


async def test_an_unreachable_tier_is_reported_not_fatal(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir)
    async with open_stack(settings) as stack:
        await stack.execute.stop()
        async with MonitorClient(stack.coordinate.target) as monitor:
            response = await monitor.get_metrics(tiers=[COORDINATE, EXECUTE])
    assert not response.tiers[0].HasField("error")
    assert response.tiers[1].error.reason == "UNAVAILABLE"


async def test_alerts_are_raised_streamed_and_resolved(data_dir: Path, http_server: HttpServer) -> None:
    thresholds = Thresholds(response_time_seconds=0.05, error_rate=0.2, min_calls=3)
    settings = Settings(
        data_dir=data_dir, monitor_interval_seconds=0.2, alert_thresholds=thresholds, slow_tool_seconds=0.05
    )

    def slow(request: BaseHTTPRequestHandler) -> None:
        time.sleep(0.1)
        reply(b"{}")(request)

    http_server.routes["/slow"] = slow
    slow_call = executor_service_pb2.ExecuteToolRequest(
        call=common_pb2.ToolCall(tool="http.request", arguments=to_struct({"url": f"{http_server.url}/slow"}))
    )
    bad = executor_service_pb2.ExecuteToolRequest(call=common_pb2.ToolCall(tool="no.such.tool"))
    alert_id = "HIGH_RESPONSE_TIME:execute:/tierstack.v1.ExecutorService/ExecuteTool"
    async with open_stack(settings) as stack, MonitorClient(stack.coordinate.target) as monitor:

        async def keep_calling() -> None:
            while True:
                await stack.executor.execute_tool(slow_call)
                with pytest.raises(InvalidArgumentError):  # the caller's fault: no HIGH_ERROR_RATE
                    await stack.executor.execute_tool(bad)

        load = asyncio.create_task(keep_calling())
        seen: list[pb.Alert] = []
        try:
            async with asyncio.timeout(20):
                async for alert in monitor.watch_alerts():
                    seen.append(alert)
                    if alert.id == alert_id and not alert.HasField("resolve_time"):
                        snapshot = await anext(aiter(monitor.watch_metrics(0.1, tiers=[EXECUTE])))
                        assert alert_id in {a.id for a in snapshot.active_alerts}
                        load.cancel()  # no more slow calls: a later interval resolves it
                    if alert.id == alert_id and alert.HasField("resolve_time"):
                        break
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
    raised = next(a for a in seen if a.id == alert_id)
    assert raised.kind == pb.ALERT_KIND_HIGH_RESPONSE_TIME and raised.tier == EXECUTE
    assert raised.value > 0.05 and raised.threshold == 0.05
    assert not any(a.kind == pb.ALERT_KIND_HIGH_ERROR_RATE for a in seen)
    # It says what to do: the tool its calls wait for is slow.
    advice = raised.recommendation
    assert advice.title == "Tool http.request is slow" and advice.tier == EXECUTE
    assert advice.effort == pb.RECOMMENDATION_EFFORT_MEDIUM
    assert advice.estimated_impact.unit == pb.IMPACT_UNIT_SECONDS and advice.estimated_impact.value > 0


def sleep_call(seconds: float) -> executor_service_pb2.ExecuteToolRequest:
    return executor_service_pb2.ExecuteToolRequest(
        call=common_pb2.ToolCall(tool="core.sleep", arguments=to_struct({"seconds": seconds}))
    )


async def test_recommendations_name_their_evidence_impact_and_effort(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, slow_tool_seconds=0.01)
    async with open_stack(settings) as stack, MonitorClient(stack.coordinate.target) as monitor:
        assert await monitor.get_recommendations() == []
        await stack.executor.execute_tool(sleep_call(0.05))
        [advice] = await monitor.get_recommendations()
    assert advice.priority == pb.RECOMMENDATION_PRIORITY_MEDIUM and advice.tier == EXECUTE
    assert advice.title == "Tool core.sleep is slow"
    assert advice.metric == "execute.tools.core.sleep.latency.p95"
    assert advice.value >= 0.05 and advice.threshold == 0.01
    assert advice.effort == pb.RECOMMENDATION_EFFORT_MEDIUM
    impact = advice.estimated_impact
    assert impact.unit == pb.IMPACT_UNIT_SECONDS and impact.value == pytest.approx(advice.value - 0.01)
    assert "s off the p95 of 1 calls" in impact.summary
    assert 0 < advice.window.ToNanoseconds() <= 300 * 10**9


async def test_recommendations_forget_what_happened_before_the_window(data_dir: Path) -> None:
    settings = Settings(
        data_dir=data_dir, slow_tool_seconds=0.01, monitor_interval_seconds=0.05, advice_window_seconds=1.0
    )
    async with open_stack(settings) as stack, MonitorClient(stack.coordinate.target) as monitor:
        await asyncio.sleep(0.3)  # the monitor's first snapshots
        await stack.executor.execute_tool(sleep_call(0.05))
        [advice] = await monitor.get_recommendations()
        assert advice.title == "Tool core.sleep is slow" and advice.window.ToNanoseconds() <= 10**9
        for _ in range(200):  # a second later, the window no longer holds the slow call
            if not await monitor.get_recommendations():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the slow call is advised on forever")
        # The metrics since the start still count it; a new slow call calls for advice again.
        [execute] = (await monitor.get_metrics(tiers=[EXECUTE])).tiers
        assert next(t for t in execute.execute.tools if t.name == "core.sleep").latency.count == 1
        await stack.executor.execute_tool(sleep_call(0.05))
        [again] = await monitor.get_recommendations()
    assert again.title == "Tool core.sleep is slow"
