"""What every tierstack server offers: health, reflection (grpcurl), metrics and a graceful stop."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import HttpServer, Stack, grpcurl, reply, start_tier, wait_for
from tierstack.client import ExecutorClient, MonitorClient, UnavailableError
from tierstack.core.values import from_value, to_struct
from tierstack.server import BindError, Settings, TierServer, service_for
from tierstack.v1 import common_pb2, executor_service_pb2


async def test_grpcurl_lists_and_calls_every_tier_through_reflection(stack: Stack) -> None:
    expected = {
        stack.execute.target: "tierstack.v1.ExecutorService",
        stack.orchestrate.target: "tierstack.v1.OrchestratorService",
        stack.coordinate.target: "tierstack.v1.CoordinatorService",
    }
    for target, service in expected.items():
        listed = (await asyncio.to_thread(grpcurl, target, "list")).split()
        assert set(listed) == {
            service,
            "tierstack.v1.MonitorService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
    echo = await asyncio.to_thread(
        grpcurl,
        stack.execute.target,
        "-d",
        '{"call": {"tool": "core.echo", "arguments": {"value": "hi"}}}',
        "tierstack.v1.ExecutorService/ExecuteTool",
    )
    assert json.loads(echo)["result"]["output"] == "hi"
    plan = await asyncio.to_thread(
        grpcurl,
        stack.orchestrate.target,
        "-d",
        json.dumps(
            {
                "workflow": {
                    "steps": [
                        {"id": "a", "tool": "core.echo"},
                        {"id": "b", "tool": "core.echo", "depends_on": ["a"]},
                    ]
                }
            }
        ),
        "tierstack.v1.OrchestratorService/PlanWorkflow",
    )
    assert json.loads(plan)["plan"]["batches"] == [{"step_ids": ["a"]}, {"step_ids": ["b"]}]
    team = await asyncio.to_thread(
        grpcurl,
        stack.coordinate.target,
        "-d",
        json.dumps(
            {
                "agents": [{"id": "w", "capabilities": ["writing"]}],
                "subtasks": [{"id": "s1", "required_capabilities": ["writing"]}],
            }
        ),
        "tierstack.v1.CoordinatorService/FormTeam",
    )
    assert json.loads(team)["assignments"][0]["agent_id"] == "w"
    every_tier = json.dumps({"tiers": ["TIER_COORDINATE", "TIER_ORCHESTRATE", "TIER_EXECUTE"]})
    metrics = await asyncio.to_thread(
        grpcurl, stack.coordinate.target, "-d", every_tier, "tierstack.v1.MonitorService/GetMetrics"
    )
    assert [t["tier"] for t in json.loads(metrics)["tiers"]] == ["TIER_COORDINATE", "TIER_ORCHESTRATE", "TIER_EXECUTE"]


async def test_health_turns_not_serving_when_the_server_stops(http_server: HttpServer) -> None:
    server = await start_tier("execute", Settings())
    channel = grpc.aio.insecure_channel(server.target)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        for name in ("", "tierstack.v1.ExecutorService", "tierstack.v1.MonitorService"):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="tierstack.v1.ExecutorService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop())
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
    finally:
        await channel.close()


async def test_a_stopping_server_lets_calls_in_flight_finish(http_server: HttpServer) -> None:
    release = threading.Event()

    def slow(request: BaseHTTPRequestHandler) -> None:
        release.wait(10)
        reply(b'"late but complete"')(request)

    http_server.routes["/slow"] = slow
    server = await start_tier("execute", Settings())
    async with ExecutorClient(server.target) as client:
        call = asyncio.create_task(
            client.execute_tool(
                executor_service_pb2.ExecuteToolRequest(
                    call=common_pb2.ToolCall(
                        tool="http.request", arguments=to_struct({"url": f"{http_server.url}/slow"})
                    )
                )
            )
        )
        await wait_for(lambda: "/slow" in http_server.hits)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.05)
        release.set()
        response = await call
        await stopping
        output = from_value(response.result.output)
        assert isinstance(output, dict) and output["json"] == "late but complete"
        with pytest.raises(UnavailableError):
            await client.execute_tool(executor_service_pb2.ExecuteToolRequest(), timeout=2)


async def test_a_server_on_a_taken_port_fails_before_its_tier_starts(stack: Stack, tmp_path: Path) -> None:
    second = TierServer(service_for("orchestrate", Settings(data_dir=tmp_path / "second")), port=stack.orchestrate.port)
    with pytest.raises(BindError, match=f"cannot listen on {stack.orchestrate.target}"):
        await second.start()
    await second.stop()
    assert not (tmp_path / "second").exists()  # its run store was never opened, no run resumed
    assert (await stack.orchestrator.list_runs()).runs == []  # the first one serves on


async def test_get_metrics_reports_latency_and_codes_per_method(stack: Stack) -> None:
    echo = executor_service_pb2.ExecuteToolRequest(
        call=common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": 1}))
    )
    for _ in range(20):
        await stack.executor.execute_tool(echo)
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        await stack.executor.execute_tool(executor_service_pb2.ExecuteToolRequest())
    async with MonitorClient(stack.execute.target) as monitor:
        metrics = await monitor.get_metrics("ExecuteTool")
    [tier] = metrics.tiers
    assert tier.tier == common_pb2.TIER_EXECUTE
    [method] = tier.methods
    assert method.method == "/tierstack.v1.ExecutorService/ExecuteTool"
    assert method.latency.count == 21 and method.in_flight == 0
    assert dict(method.counts_by_code) == {"OK": 20, "INVALID_ARGUMENT": 1}
    latency = method.latency
    p50, p95, p99, top = (d.ToNanoseconds() for d in (latency.p50, latency.p95, latency.p99, latency.max))
    assert 0 < p50 <= p95 <= p99 <= top
    assert sum(latency.histogram.buckets.values()) == 21
    assert tier.process.rss_bytes > 10 * 2**20 and tier.process.cpu_time.ToNanoseconds() > 0
