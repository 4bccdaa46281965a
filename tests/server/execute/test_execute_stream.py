"""ExecuteStream: many steps over one long-lived stream, each call served as Execute serves its own:
bounded, authorised per caller, refused alone when wrong while the stream and its other calls go on,
and ended gracefully when Execute stops."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.helpers import Stack, start_tier, wait_for
from tests.server.auth.test_tenants import open_tenants
from tierstack.client import MonitorClient
from tierstack.client.errors import from_status
from tierstack.core.errors import Code, TierstackError
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings
from tierstack.server.execute import stream as execute_stream
from tierstack.v1 import common_pb2
from tierstack.v1 import executor_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

METHOD = "/tierstack.v1.ExecutorService/ExecuteStream"


def _serialize(message: pb.ExecuteStreamRequest | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class RawStream:
    """One ExecuteStream spoken by hand, as any client (or a hostile one) may; answers are sorted by
    the call they name."""

    def __init__(self, target: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        open_stream = self._channel.stream_stream(
            METHOD, request_serializer=_serialize, response_deserializer=pb.ExecuteStreamResponse.FromString
        )
        self.call: Any = open_stream(metadata=tuple(metadata))
        self._answers: dict[int, list[pb.ExecuteStreamResponse]] = defaultdict(list)

    async def send(self, message: pb.ExecuteStreamRequest | bytes) -> None:
        await self.call.write(message)

    async def read(self) -> pb.ExecuteStreamResponse | Any:
        return await asyncio.wait_for(self.call.read(), 30)

    async def answers(self, number: int) -> list[pb.ExecuteStreamResponse]:
        """Returns the answers of call ``number`` up to its end, reading the stream as far as needed."""
        while not any(a.WhichOneof("result") in ("ended", "cancelled") for a in self._answers[number]):
            answer = await self.read()
            assert answer is not grpc.aio.EOF, "the stream ended"
            self._answers[answer.call].append(answer)
        return self._answers.pop(number)

    def unread(self, number: int) -> list[pb.ExecuteStreamResponse]:
        return self._answers.pop(number, [])

    async def close(self) -> None:
        await self._channel.close()


@pytest.fixture
async def raw(stack: Stack) -> AsyncIterator[RawStream]:
    opened = RawStream(stack.execute.target)
    yield opened
    await opened.close()


def step(tool: str, execution_id: str = "", **arguments: Any) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(
        execution_id=execution_id,
        step_id="s",
        tool_calls=[common_pb2.ToolCall(tool=tool, arguments=to_struct(arguments))],
    )


def failure(answers: list[pb.ExecuteStreamResponse]) -> TierstackError:
    ended = answers[-1].ended
    assert ended.code, answers
    return from_status(ended.code, ended.message, ended.details)


def output(answers: list[pb.ExecuteStreamResponse]) -> Any:
    assert answers[-1].ended.code == 0, answers
    [found] = [a.event.output.value for a in answers if a.event.HasField("output")]
    return from_value(found)


async def test_a_wrong_call_is_refused_alone_and_the_stream_serves_on(raw: RawStream) -> None:
    await raw.send(pb.ExecuteStreamRequest(call=1, execute=step("core.echo", value="first")))
    assert output(await raw.answers(1)) == "first"

    # Out of bounds, each named by its field; nothing ran.
    await raw.send(pb.ExecuteStreamRequest(call=0, execute=step("core.echo", value="zero")))
    refused = failure(await raw.answers(0))
    assert refused.code is Code.INVALID_ARGUMENT and [v.field for v in refused.violations] == ["call"]
    large = step("core.echo")
    large.tool_calls.extend([large.tool_calls[0]] * 100)
    await raw.send(pb.ExecuteStreamRequest(call=2, trace_context={f"k{i}": "v" for i in range(5)}, execute=large))
    refused = failure(await raw.answers(2))
    assert {v.field for v in refused.violations} == {"trace_context", "execute.tool_calls"}
    await raw.send(pb.ExecuteStreamRequest(call=3))
    assert [v.field for v in failure(await raw.answers(3)).violations] == ["action"]

    # Bytes that are no message at all.
    await raw.send(b"\xff\xff\xff")
    assert failure(await raw.answers(0)).reason == "MALFORMED_REQUEST"

    # A number already in flight is refused; the call that holds it goes on.
    await raw.send(pb.ExecuteStreamRequest(call=4, execute=step("core.sleep", seconds=0.3)))
    await raw.send(pb.ExecuteStreamRequest(call=4, execute=step("core.echo", value="again")))
    answers = await raw.answers(4)
    assert failure(answers).code is Code.INVALID_ARGUMENT
    assert (await raw.answers(4))[-1].ended.code == 0

    await raw.send(pb.ExecuteStreamRequest(call=5, execute=step("core.echo", value="still serving")))
    assert output(await raw.answers(5)) == "still serving"


async def test_a_released_step_runs_on_until_cancelled_and_sends_nothing_more(raw: RawStream) -> None:
    await raw.send(pb.ExecuteStreamRequest(call=1, execute=step("core.sleep", "nap-1", seconds=60)))
    await raw.send(pb.ExecuteStreamRequest(call=1, release=empty_pb2.Empty()))
    await raw.send(pb.ExecuteStreamRequest(call=2, cancel=pb.CancelExecutionRequest(execution_id="nap-1")))
    [answer] = await raw.answers(2)
    assert answer.cancelled.cancelled, "the step ran on after its caller let it go"
    await raw.send(pb.ExecuteStreamRequest(call=3, cancel=pb.CancelExecutionRequest(execution_id="nap-1")))
    [answer] = await raw.answers(3)
    assert not answer.cancelled.cancelled
    assert raw.unread(1) == []


async def test_a_stream_holds_a_bounded_number_of_calls(raw: RawStream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute_stream, "MAX_STREAM_CALLS", 2)
    for number in (1, 2, 3):
        await raw.send(pb.ExecuteStreamRequest(call=number, execute=step("core.sleep", seconds=0.2)))
    refused = failure(await raw.answers(3))
    assert refused.code is Code.RESOURCE_EXHAUSTED and refused.reason == "TOO_MANY_CALLS"
    assert [(await raw.answers(n))[-1].ended.code for n in (1, 2)] == [0, 0]


async def test_a_stopping_execute_refuses_new_steps_and_ends_the_stream_once_its_steps_end(tmp_path: Path) -> None:
    execute = await start_tier("execute", Settings(data_dir=tmp_path))
    raw = RawStream(execute.target)
    stopping: asyncio.Task[None] | None = None
    try:
        await raw.send(pb.ExecuteStreamRequest(call=1, execute=step("core.sleep", seconds=0.5)))
        await wait_for(lambda: execute.metrics.in_flight["/tierstack.v1.ExecutorService/Execute"] == 1)
        stopping = asyncio.create_task(execute.stop())
        for number in itertools.count(2):  # steps are served until Execute learns that it stops
            await raw.send(pb.ExecuteStreamRequest(call=number, execute=step("core.echo", value="late")))
            answers = await raw.answers(number)
            if answers[-1].ended.code:
                break
        refused = failure(answers)
        assert refused.code is Code.UNAVAILABLE and refused.reason == "STOPPING"
        assert (await raw.answers(1))[-1].ended.code == 0, "the step in flight ended as it would have"
        assert await raw.read() is grpc.aio.EOF
        assert await raw.call.code() == grpc.StatusCode.OK
    finally:
        await raw.close()
        await (stopping or execute.stop())


async def test_the_steps_of_many_runs_travel_over_a_few_streams(stack: Stack) -> None:
    wf = orchestrator_pb.Workflow(
        name="fan",
        steps=[
            orchestrator_pb.WorkflowStep(id=f"s{i}", tool="core.echo", parameters=to_struct({"value": i}))
            for i in range(20)
        ],
    )
    for _ in range(3):
        events = [e async for e in stack.orchestrator.orchestrate(orchestrator_pb.OrchestrateRequest(workflow=wf))]
        assert events[-1].HasField("run_completed")
    async with MonitorClient(stack.execute.target) as monitor:
        [tier] = (await monitor.get_metrics("ExecutorService/Execute")).tiers
    methods = {m.method.rsplit("/", 1)[-1]: m for m in tier.methods}
    assert methods["Execute"].counts_by_code["OK"] == 60
    assert 1 <= methods["ExecuteStream"].in_flight <= 4
    assert sum(methods["ExecuteStream"].counts_by_code.values()) == 0, "no stream was opened per step"


async def test_a_tier_carries_each_tenants_calls_as_its_own_and_only_a_tier_may(tmp_path: Path) -> None:
    async with open_tenants(tmp_path) as tenants:
        target = tenants.stack.execute.target
        raw = RawStream(target, [("authorization", f"Bearer {tenants.keys['system tier']}")])
        try:
            for number, tenant in enumerate(("acme", "globex", "acme"), start=1):
                request = step("core.echo", "step-1", value=f"{tenant} {number}")
                request.context.tenant_id = tenant
                await raw.send(pb.ExecuteStreamRequest(call=number, execute=request))
                assert output(await raw.answers(number)) in {f"{tenant} {number}", "acme 1"}
            # The same execution id ran once for each tenant: globex's was its own, acme's replayed.
            assert output(await _again(raw, 4, "globex")) == "globex 2"
            assert output(await _again(raw, 5, "acme")) == "acme 1"
        finally:
            await raw.close()
        tenant_key = RawStream(target, [("authorization", f"Bearer {tenants.keys['acme admin']}")])
        try:
            await tenant_key.send(pb.ExecuteStreamRequest(call=1, execute=step("core.echo", value="x")))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await tenant_key.read()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await tenant_key.close()


async def _again(raw: RawStream, number: int, tenant: str) -> list[pb.ExecuteStreamResponse]:
    request = step("core.echo", "step-1", value="ignored")
    request.context.tenant_id = tenant
    await raw.send(pb.ExecuteStreamRequest(call=number, execute=request))
    return await raw.answers(number)
