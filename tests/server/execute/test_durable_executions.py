"""Execute survives itself: a finished execution is replayed after a restart, an approval keeps
waiting across one, and a second call for an execution in flight joins it instead of running it
twice; with replicas, an approval is answered and an execution cancelled on any of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.helpers import HttpServer, reply, slowly, start_tier
from tierstack.client import ExecutorClient
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server import Settings, TierServer
from tierstack.server.execute import tool
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2
from tools.postgres import LocalPostgres


@tool("bank.transfer", needs_approval=True)
async def transfer(amount: float) -> JSON:
    return {"sent": amount}


_slow = slowly(reply(json.dumps({"ok": True}).encode()), 0.2)  # long enough for a second call to arrive


async def _execute(data_dir: Path, store_url: str = "") -> TierServer:
    server = await start_tier("execute", Settings(data_dir=data_dir, store_url=store_url, approval_timeout_seconds=60))
    service = server.service
    assert isinstance(service, ExecuteService)
    service.registry.register(transfer)
    return server


def _step(execution_id: str, call: common_pb2.ToolCall) -> executor_service_pb2.ExecuteRequest:
    return executor_service_pb2.ExecuteRequest(progress=True, execution_id=execution_id, step_id="a", tool_calls=[call])


async def _events(client: ExecutorClient, request: executor_service_pb2.ExecuteRequest) -> list[str]:
    return [event.WhichOneof("payload") or "" async for event in client.execute(request)]


async def test_a_finished_execution_is_replayed_after_a_restart(
    tmp_path: Path, http_server: HttpServer, store_url: str
) -> None:
    http_server.routes["/charge"] = _slow
    call = common_pb2.ToolCall(tool="http.request", arguments=to_struct({"url": f"{http_server.url}/charge"}))
    request = _step("run1/a/1", call)
    first = await _execute(tmp_path / "first", store_url)
    async with ExecutorClient(first.target) as client:
        before = await _events(client, request)
    await first.stop()
    # On PostgreSQL another replica, with a folder of its own, replays it just as well.
    second = await _execute(tmp_path / ("first" if not store_url else "second"), store_url)
    try:
        async with ExecutorClient(second.target) as client:
            after = [event async for event in client.execute(request)]
    finally:
        await second.stop()
    assert before[-1] == "completed"
    assert [event.WhichOneof("payload") for event in after] == before
    output = next(event.output.value for event in after if event.HasField("output"))
    assert from_value(output.struct_value.fields["json"]) == {"ok": True}
    assert http_server.hits == ["/charge"]  # the tool ran once


async def test_a_call_for_an_execution_in_flight_joins_it(data_dir: Path, http_server: HttpServer) -> None:
    http_server.routes["/charge"] = _slow
    call = common_pb2.ToolCall(tool="http.request", arguments=to_struct({"url": f"{http_server.url}/charge"}))
    request = _step("run2/a/1", call)
    server = await _execute(data_dir)
    try:
        async with ExecutorClient(server.target) as client:
            first, second = await asyncio.gather(_events(client, request), _events(client, request))
    finally:
        await server.stop()
    assert first == second and first[-1] == "completed"
    assert http_server.hits == ["/charge"]


async def test_an_approval_keeps_waiting_across_a_restart(tmp_path: Path, store_url: str) -> None:
    call = common_pb2.ToolCall(tool="bank.transfer", arguments=to_struct({"amount": 5}))
    request = _step("run3/pay/1", call)
    first = await _execute(tmp_path / "first", store_url)
    async with ExecutorClient(first.target) as client:
        async for event in client.execute(request):
            if event.HasField("approval_required"):
                waiting = event.approval_required
                break
    await first.stop()
    second = await _execute(tmp_path / ("first" if not store_url else "second"), store_url)
    try:
        async with ExecutorClient(second.target) as client:
            outcome = []
            async for event in client.execute(request):  # the step, asked for again
                if event.HasField("approval_required"):
                    assert event.approval_required.approval_id == waiting.approval_id
                    assert event.approval_required.expire_time == waiting.expire_time
                    await client.approve_tool_call(waiting.approval_id, approver="ada")
                elif event.HasField("output"):
                    outcome.append(from_value(event.output.value))
    finally:
        await second.stop()
    assert outcome == [{"sent": 5}]


@tool("test.block")
async def block() -> JSON:
    await asyncio.Event().wait()  # until cancelled
    return None


async def _replicas(tmp_path: Path, postgres_server: LocalPostgres) -> tuple[TierServer, TierServer]:
    url = postgres_server.new_database()
    first, second = await asyncio.gather(_execute(tmp_path / "first", url), _execute(tmp_path / "second", url))
    for server in (first, second):
        service = server.service
        assert isinstance(service, ExecuteService)
        service.registry.register(block)
    return first, second


async def test_an_approval_is_answered_on_the_replica_that_does_not_run_the_step(
    tmp_path: Path, postgres_server: LocalPostgres
) -> None:
    request = _step("run4/pay/1", common_pb2.ToolCall(tool="bank.transfer", arguments=to_struct({"amount": 7})))
    first, second = await _replicas(tmp_path, postgres_server)
    try:
        async with ExecutorClient(first.target) as runner, ExecutorClient(second.target) as other:
            outcome = []
            async with asyncio.timeout(30):  # the approval itself would wait 60 s for an answer it missed
                async for event in runner.execute(request):
                    if event.HasField("approval_required"):
                        await other.approve_tool_call(event.approval_required.approval_id, approver="ada")
                    elif event.HasField("output"):
                        outcome.append(from_value(event.output.value))
    finally:
        await asyncio.gather(first.stop(), second.stop())
    assert outcome == [{"sent": 7}]


async def test_an_execution_is_cancelled_through_the_replica_that_does_not_run_it(
    tmp_path: Path, postgres_server: LocalPostgres
) -> None:
    request = _step("run5/wait/1", common_pb2.ToolCall(tool="test.block"))
    first, second = await _replicas(tmp_path, postgres_server)
    try:
        async with ExecutorClient(first.target) as runner, ExecutorClient(second.target) as other:
            seen = []
            async for event in runner.execute(request):
                seen.append(event.WhichOneof("payload"))
                if event.HasField("tool_call_started"):
                    assert await other.cancel_execution(request.execution_id)
    finally:
        await asyncio.gather(first.stop(), second.stop())
    assert "tool_call_started" in seen
    assert not {"completed", "failed"} & set(seen)  # stopped, not finished
