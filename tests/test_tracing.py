"""OpenTelemetry across three processes: one goal makes one trace, exported over OTLP to a trace
receiver that the test runs (the collector's TraceService, from opentelemetry-proto)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.helpers import HttpServer, reply, spawned_stack
from tierstack.client import CoordinatorClient
from tierstack.v1 import coordinator_service_pb2 as pb

Span = tuple[str, trace_pb2.Span]  # (service.name, span)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with the name of the service that sent it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((attributes["service.name"], span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    found = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield found, port
    await server.stop(None)


async def test_one_goal_is_one_trace_across_three_processes(
    receiver: tuple[Receiver, int], http_server: HttpServer, tmp_path: Path
) -> None:
    spans, port = receiver
    http_server.routes["/report.json"] = reply(json.dumps({"errors": 3}).encode())
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    async with spawned_stack(tmp_path, env) as started:
        async with CoordinatorClient(started["coordinate"].target) as client:
            agents = [pb.Agent(id="a", capabilities=["http", "writing"], max_concurrent_tasks=2)]
            goal = f"fetch {http_server.url}/report.json then write a summary"
            events = [e async for e in client.coordinate(pb.CoordinateRequest(goal=goal, agents=agents))]
        assert events[-1].HasField("goal_completed")
    # Leaving the block stopped the three servers gracefully, which sends the spans they still held.
    assert all(process.process.returncode == 0 for process in started.values())

    by_id = {span.span_id: (service, span) for service, span in spans.spans}
    [(_, root)] = [
        (service, span) for service, span in spans.spans if span.name.endswith("CoordinatorService/Coordinate")
    ]
    assert not root.parent_span_id, "the Coordinate call starts the trace"
    goal_spans = [(service, span) for service, span in spans.spans if span.trace_id == root.trace_id]
    assert len(goal_spans) == len(spans.spans), "every span belongs to the goal's trace"

    def chain(span: trace_pb2.Span) -> list[tuple[str, str]]:
        """Returns (service, span name) from ``span`` up to the root."""
        found = []
        while True:
            service, span = by_id[span.span_id]
            found.append((service, span.name))
            if not span.parent_span_id:
                return found
            span = by_id[span.parent_span_id][1]

    tools = sorted((span for _, span in goal_spans if span.name.startswith("tool ")), key=lambda s: s.name)
    assert [span.name for span in tools] == ["tool http.request", "tool text.template"]
    for tool, subtask in zip(tools, ("s1", "s2"), strict=True):
        assert chain(tool) == [
            ("tierstack-execute", tool.name),
            ("tierstack-execute", "/tierstack.v1.ExecutorService/Execute"),
            ("tierstack-orchestrate", "/tierstack.v1.ExecutorService/Execute"),
            ("tierstack-orchestrate", f"step {subtask}"),
            ("tierstack-orchestrate", "/tierstack.v1.OrchestratorService/StartRun"),
            ("tierstack-coordinate", "/tierstack.v1.OrchestratorService/StartRun"),
            ("tierstack-coordinate", f"subtask {subtask}"),
            ("tierstack-coordinate", "/tierstack.v1.CoordinatorService/Coordinate"),
        ]
    assert {name for _, name in {(s, span.name) for s, span in goal_spans}} >= {"decompose goal", "form team"}
    # Log lines carry the trace id.
    trace_id = root.trace_id.hex()
    for process in started.values():
        assert any(f"trace={trace_id}" in line for line in process.lines), process.lines
