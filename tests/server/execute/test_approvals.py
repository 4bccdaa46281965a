"""Tools that wait for a person: approved, rejected, or rejected when nobody answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from tests.helpers import start_tier, wait_for
from tierstack.client import ExecutorClient, FailedPreconditionError, NotFoundError
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server import Settings
from tierstack.server.execute import tool
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2


@tool("bank.transfer", needs_approval=True)
async def transfer(amount: float) -> JSON:
    return {"sent": amount}


@pytest.fixture
async def executor() -> AsyncIterator[ExecutorClient]:
    server = await start_tier("execute", Settings(approval_timeout_seconds=0.5))
    service = server.service
    assert isinstance(service, ExecuteService)
    service.registry.register(transfer)
    async with ExecutorClient(server.target) as client:
        yield client
    await server.stop()


def step(amount: float) -> executor_service_pb2.ExecuteRequest:
    call = common_pb2.ToolCall(tool="bank.transfer", arguments=to_struct({"amount": amount}))
    return executor_service_pb2.ExecuteRequest(progress=True, step_id="pay", tool_calls=[call])


async def test_an_approved_call_runs(executor: ExecutorClient) -> None:
    stream = executor.execute(step(10))
    kinds = []
    async for event in stream:
        kinds.append(event.WhichOneof("payload"))
        if event.HasField("approval_required"):
            waiting = event.approval_required
            assert (waiting.tool, from_value(waiting.arguments.fields["amount"])) == ("bank.transfer", 10)
            assert (await executor.approve_tool_call(waiting.approval_id, approver="ada")).tool == "bank.transfer"
        elif event.HasField("output"):
            assert from_value(event.output.value) == {"sent": 10}
    assert kinds == [
        "started",
        "strategy_selected",
        "approval_required",
        "tool_call_started",
        "tool_call_finished",
        "output",
        "completed",
    ]


async def test_a_rejected_call_fails_its_step_without_running(executor: ExecutorClient) -> None:
    events = []
    async for event in executor.execute(step(99)):
        events.append(event)
        if event.HasField("approval_required"):
            await executor.reject_tool_call(event.approval_required.approval_id, reason="too much")
    assert [e.WhichOneof("payload") for e in events][-2:] == ["tool_call_finished", "failed"]
    error = events[-1].failed.error
    assert (error.reason, error.message) == ("TOOL_REJECTED", "bank.transfer was not approved: too much")
    assert events[-1].failed.usage.tool_calls == 0


async def test_a_call_nobody_answers_is_rejected_when_its_time_runs_out(executor: ExecutorClient) -> None:
    events = [event async for event in executor.execute(step(1))]
    approval_id = next(e.approval_required.approval_id for e in events if e.HasField("approval_required"))
    assert events[-1].failed.error.message == "bank.transfer was not approved: nobody answered within 0.5 s"
    with pytest.raises(NotFoundError):
        await executor.approve_tool_call(approval_id)


async def test_approval_is_only_asked_for_within_a_step(executor: ExecutorClient) -> None:
    call = common_pb2.ToolCall(tool="bank.transfer", arguments=to_struct({"amount": 1}))
    with pytest.raises(FailedPreconditionError) as caught:
        await executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=call))
    assert caught.value.reason == "APPROVAL_REQUIRED"
    with pytest.raises(NotFoundError):
        await executor.reject_tool_call("no-such-approval")


async def test_approvals_whose_callers_left_are_forgotten() -> None:
    server = await start_tier("execute", Settings(approval_timeout_seconds=0.5))
    service = server.service
    assert isinstance(service, ExecuteService)
    service.registry.register(transfer)
    opened = []
    try:
        async with ExecutorClient(server.target) as executor:
            for amount in range(20):
                async for event in executor.execute(step(amount)):
                    if event.HasField("approval_required"):
                        opened.append(event.approval_required.approval_id)
                        break  # the caller leaves before anyone answers
            approvals = service.executor.approvals
            await wait_for(lambda: len(approvals) == 0, attempts=3000)  # nothing waits in the server
            assert len(set(opened)) == 20
            kept = [await service.executor.store.approval(approval_id) for approval_id in opened]
            expiry = max(approval.expire_ns for approval in kept if approval is not None)
            await wait_for(lambda: time.time_ns() > expiry, attempts=3000)
            for approval_id in opened:  # once their time is up, none can be answered any more
                with pytest.raises(NotFoundError):
                    await executor.approve_tool_call(approval_id)
    finally:
        await server.stop()
