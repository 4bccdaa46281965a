"""ExecuteTools, the per-tool monitor and cancellation, through the SDK against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import Stack, start_tier, wait_for
from tierstack.client import DeadlineExceededError, ExecutorClient, InvalidArgumentError
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server import Settings, TierServer
from tierstack.server.execute import Tool, ToolContext, ToolSource
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2


class Probe:
    """Python tools that report how many calls run at once, and whether a call was cancelled."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.cancelled = 0
        self.gates: dict[int, asyncio.Event] = {}

    async def hold(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gates.setdefault(arguments["n"], asyncio.Event()).wait()
            return arguments["n"]  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    def register(self, server: TierServer) -> None:
        service = server.service
        assert isinstance(service, ExecuteService)
        service.registry.register(
            Tool(
                name="test.hold",
                description="waits for its gate",
                parameters={"type": "object"},
                handler=self.hold,
                source=ToolSource.PYTHON,
            )
        )


def calls(*items: tuple[str, dict[str, Any]]) -> list[common_pb2.ToolCall]:
    return [common_pb2.ToolCall(tool=tool, arguments=to_struct(arguments)) for tool, arguments in items]


@pytest.fixture
def probe(stack: Stack) -> Probe:
    found = Probe()
    found.register(stack.execute)
    return found


async def test_results_stream_as_they_finish_with_their_index(stack: Stack, probe: Probe) -> None:
    request = executor_service_pb2.ExecuteToolsRequest(
        calls=calls(("test.hold", {"n": 0}), ("json.query", {"data": 1, "expression": "[?"}), ("test.hold", {"n": 2}))
    )
    stream = stack.executor.execute_tools(request)
    first = await anext(stream)
    assert first.call_finished.index == 1 and first.call_finished.result.error.reason == "INVALID_EXPRESSION"
    await wait_for(lambda: probe.running == 2)
    probe.gates[2].set()
    second = await anext(stream)
    probe.gates[0].set()
    third = await anext(stream)
    assert [(e.call_finished.index, from_value(e.call_finished.result.output)) for e in (second, third)] == [
        (2, 2),
        (0, 0),
    ]
    assert [e.sequence for e in (first, second, third)] == [1, 2, 3]
    assert [e async for e in stream] == []


async def test_a_batch_runs_at_most_its_concurrency_at_once(stack: Stack, probe: Probe) -> None:
    request = executor_service_pb2.ExecuteToolsRequest(
        calls=calls(*(("test.hold", {"n": n}) for n in range(12))), max_concurrency=3
    )
    stream = stack.executor.execute_tools(request)
    results = []
    for n in range(12):
        await wait_for(lambda n=n: probe.running == min(3, 12 - n))  # type: ignore[misc]
        probe.gates.setdefault(n, asyncio.Event()).set()
        results.append(await anext(stream))
    assert probe.most == 3
    assert sorted(e.call_finished.index for e in results) == list(range(12))


async def test_the_server_caps_batches_together() -> None:
    server = await start_tier("execute", Settings(max_concurrent_tools=2))
    probe = Probe()
    probe.register(server)
    try:
        async with ExecutorClient(server.target) as client:
            batch = executor_service_pb2.ExecuteToolsRequest(
                calls=calls(*(("test.hold", {"n": n}) for n in range(4))), max_concurrency=4
            )
            streams = [client.execute_tools(batch), client.execute_tools(batch)]
            readers = [asyncio.create_task(_drain(stream)) for stream in streams]
            await wait_for(lambda: probe.running == 2)
            for n in range(4):
                probe.gates.setdefault(n, asyncio.Event()).set()
            finished = await asyncio.gather(*readers)
    finally:
        await server.stop()
    assert probe.most == 2
    assert [len(found) for found in finished] == [4, 4]


async def _drain(stream: AsyncIterator[executor_service_pb2.ToolBatchEvent]) -> list[int]:
    return [event.call_finished.index async for event in stream]


async def test_a_bad_call_rejects_the_batch_before_anything_runs(stack: Stack, probe: Probe) -> None:
    request = executor_service_pb2.ExecuteToolsRequest(calls=calls(("test.hold", {"n": 1}), ("nope", {})))
    with pytest.raises(InvalidArgumentError) as caught:
        _ = [event async for event in stack.executor.execute_tools(request)]
    assert caught.value.violations[0].field == "calls[1].tool"
    assert probe.most == 0


async def test_a_caller_that_goes_away_leaves_no_tool_running(stack: Stack, probe: Probe) -> None:
    with pytest.raises(DeadlineExceededError):
        await stack.executor.execute_tool(
            executor_service_pb2.ExecuteToolRequest(call=calls(("test.hold", {"n": 1}))[0]), timeout=0.2
        )
    await wait_for(lambda: probe.cancelled == 1)
    stream = stack.executor.execute_tools(
        executor_service_pb2.ExecuteToolsRequest(calls=calls(*(("test.hold", {"n": n}) for n in range(2, 5))))
    )
    reader = asyncio.create_task(_drain(stream))
    await wait_for(lambda: probe.running == 3)
    reader.cancel()
    await wait_for(lambda: probe.cancelled == 4 and probe.running == 0)


async def test_tool_stats_count_calls_failures_and_slow_tools(stack: Stack, probe: Probe) -> None:
    for expression in ("@", "@", "[?"):
        await stack.executor.execute_tool(
            executor_service_pb2.ExecuteToolRequest(
                call=calls(("json.query", {"data": 1, "expression": expression}))[0]
            )
        )
    probe.gates[7] = asyncio.Event()
    held = asyncio.create_task(
        stack.executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=calls(("test.hold", {"n": 7}))[0]))
    )
    await wait_for(lambda: probe.running == 1)
    await asyncio.sleep(0.05)
    probe.gates[7].set()
    await held
    stats = await stack.executor.get_tool_stats(slow_threshold=0.02)
    by_tool = {tool.tool: tool for tool in stats.tools}
    query = by_tool["json.query"]
    assert (query.calls, query.failures, query.last_error.reason) == (3, 1, "INVALID_EXPRESSION")
    assert 0 < query.p50.ToNanoseconds() <= query.p99.ToNanoseconds() <= query.p999.ToNanoseconds()
    assert list(stats.slow_tools) == ["test.hold"]
    assert by_tool["test.hold"].average.ToNanoseconds() >= 50_000_000
    default = await stack.executor.get_tool_stats()
    assert default.slow_threshold.ToNanoseconds() == 1_000_000_000 and list(default.slow_tools) == []
