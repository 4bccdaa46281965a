"""Calls carried over long-lived streams (ExecuteStream from Orchestrate, WatchRuns from Coordinate):
many at once, each served as the RPC it stands for: bounded, authorised for the caller it names,
refused alone when wrong while the stream and its other calls go on, and ended gracefully when the
server stops."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.helpers import HttpServer, Stack, reply, start_tier, wait_for
from tests.server.auth.test_tenants import open_tenants
from tests.server.coordinate.test_coordinator_service import AGENTS
from tierstack.client import ExecutorClient, MonitorClient, OrchestratorClient
from tierstack.client.clients import open_channel
from tierstack.client.errors import from_status
from tierstack.core.errors import Code, ResourceExhaustedError, TierstackError, UnavailableError
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings, TierServer, multiplex
from tierstack.server.app import service_for
from tierstack.server.auth.keys import SqliteKeyStore
from tierstack.server.metrics import MethodMetrics
from tierstack.server.orchestrate.tier3 import ExecuteStreams
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import executor_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

METHOD = "/tierstack.v1.ExecutorService/ExecuteStream"
EXECUTE = "/tierstack.v1.ExecutorService/Execute"


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
        while not any(a.HasField("ended") for a in self._answers[number]):
            answer = await self.read()
            assert answer is not grpc.aio.EOF, "the stream ended"
            self._answers[answer.call].append(answer)
        return self._answers.pop(number)

    def unread(self, number: int) -> list[pb.ExecuteStreamResponse]:
        return self._answers.pop(number, [])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RawStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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
    envelope = pb.ExecuteStreamRequest(
        call=2, trace_context={f"k{i}": "v" for i in range(5)}, tenant="t" * 129, caller="c" * 129, execute=large
    )
    await raw.send(envelope)
    refused = failure(await raw.answers(2))
    assert {v.field for v in refused.violations} == {"trace_context", "tenant", "caller", "execute.tool_calls"}
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
    answer, ended = await raw.answers(2)
    assert answer.cancelled.cancelled, "the step ran on after its caller let it go"
    assert ended.ended.code == 0
    await raw.send(pb.ExecuteStreamRequest(call=3, cancel=pb.CancelExecutionRequest(execution_id="nap-1")))
    answer, _ = await raw.answers(3)
    assert not answer.cancelled.cancelled
    assert raw.unread(1) == []


async def test_a_stream_holds_a_bounded_number_of_calls(raw: RawStream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multiplex, "MAX_STREAM_CALLS", 2)
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
        answers = []
        try:
            for number, tenant in enumerate(("acme", "globex", "acme"), start=1):
                request = step("core.echo", "step-1", value=f"{tenant} {number}")
                request.context.tenant_id = "globex"  # the envelope names the tenant, not the request
                await raw.send(pb.ExecuteStreamRequest(call=number, tenant=tenant, execute=request))
                answers.append(output(await raw.answers(number)))
            # The same execution id ran once for each tenant: globex's was its own, acme's replayed.
            assert answers == ["acme 1", "globex 2", "acme 1"]
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


async def test_coordinate_follows_a_goals_runs_over_a_few_streams(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/sales.json"] = reply(json.dumps({"total": 1234}).encode())
    for _ in range(2):
        request = coordinator_pb.CoordinateRequest(
            goal=f"fetch {http_server.url}/sales.json and analyze last year, then write a report", agents=AGENTS
        )
        events = [event async for event in stack.coordinator.coordinate(request)]
        assert events[-1].HasField("goal_completed")
        assert [e for e in events if e.HasField("subtask_progress")], "the runs' events reach the goal's caller"
    async with MonitorClient(stack.orchestrate.target) as monitor:
        [tier] = (await monitor.get_metrics("OrchestratorService/WatchRun")).tiers
    methods = {m.method.rsplit("/", 1)[-1]: m for m in tier.methods}
    assert methods["WatchRun"].counts_by_code["OK"] == 6, "each subtask's run watched once, to its end"
    assert 1 <= methods["WatchRuns"].in_flight <= 2
    assert sum(methods["WatchRuns"].counts_by_code.values()) == 0, "no stream was opened per run"


async def test_a_cancelled_runs_step_is_stopped_at_tier_3_for_its_own_tenant(tmp_path: Path) -> None:
    async with open_tenants(tmp_path) as tenants:
        stack = tenants.stack
        async with (
            OrchestratorClient(stack.orchestrate.target, api_key=tenants.keys["acme run"]) as acme,
            ExecutorClient(stack.execute.target, api_key=tenants.keys["acme run"]) as acme_tools,
        ):
            nap = orchestrator_pb.WorkflowStep(id="nap", tool="core.sleep", parameters=to_struct({"seconds": 60}))
            wf = orchestrator_pb.Workflow(name="nap", steps=[nap])
            run = (await acme.start_run(orchestrator_pb.StartRunRequest(workflow=wf))).run
            async for event in acme.watch_run(run.run_id, kinds=["step_started"]):
                execution_id = f"{run.run_id}/nap/{event.step_started.attempt}"
                break
            await acme.cancel_run(run.run_id)
            # Orchestrate stopped it for acme (not for its own key's tenant): nothing is left to stop.
            await wait_for(lambda: bool(stack.execute.metrics.messages("ExecutorService/CancelExecution")))
            assert not await acme_tools.cancel_execution(execution_id)


async def test_a_revoked_tier_key_carries_nothing_more_on_a_stream_it_opened(tmp_path: Path) -> None:
    async with open_tenants(tmp_path) as tenants:
        raw = RawStream(tenants.stack.execute.target, [("authorization", f"Bearer {tenants.keys['system tier']}")])
        try:
            await raw.send(pb.ExecuteStreamRequest(call=1, tenant="acme", execute=step("core.echo", value="before")))
            assert output(await raw.answers(1)) == "before"
            keys = SqliteKeyStore.in_folder(tmp_path)
            await keys.open()
            try:
                assert await keys.revoke(tenants.key_ids["system tier"])
            finally:
                await keys.close()
            await raw.send(pb.ExecuteStreamRequest(call=2, tenant="acme", execute=step("core.echo", value="after")))
            assert failure(await raw.answers(2)).code is Code.UNAUTHENTICATED
        finally:
            await raw.close()


async def test_a_client_that_does_not_read_holds_back_its_own_stream_alone(
    stack: Stack, raw: RawStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiplex, "MAX_QUEUED_BYTES", 1024)
    flood = asyncio.create_task(_refused_forever(raw))  # each message is refused: an answer it never reads
    try:
        await asyncio.sleep(1)
        [served] = stack.execute.service._streams._streams  # type: ignore[attr-defined]
        assert served.answers.qsize() < 100, "the server stopped reading the stream instead of queueing answers"
        assert not flood.done()
        async with RawStream(stack.execute.target) as other:
            await other.send(pb.ExecuteStreamRequest(call=1, execute=step("core.echo", value="served")))
            assert output(await other.answers(1)) == "served"
    finally:
        flood.cancel()


async def _refused_forever(raw: RawStream) -> None:
    for number in itertools.count(1):
        await raw.send(pb.ExecuteStreamRequest(call=number))


@pytest.mark.parametrize("smaller", ["execute", "orchestrate"])
async def test_a_message_too_large_for_either_side_fails_its_call_alone(tmp_path: Path, smaller: str) -> None:
    small, large = 64 << 10, 16 << 20
    server_limit, client_limit = (small, large) if smaller == "execute" else (large, small)
    execute = await start_tier("execute", Settings(data_dir=tmp_path, max_message_bytes=server_limit))
    channel = open_channel(execute.target, max_message_bytes=client_limit)
    calls = ExecuteStreams(channel, MethodMetrics(), max_message_bytes=client_limit, streams=1)
    try:
        nap = asyncio.create_task(_events(calls, step("core.sleep", seconds=0.3)))
        if smaller == "execute":  # a step Orchestrate may send but Execute may not take
            too_large, reason = step("core.echo", value="x" * (small + 100)), "REQUEST_TOO_LARGE"
        else:  # an output Execute may send but Orchestrate may not take
            too_large, reason = step("text.template", template="{{ 'x' * 100000 }}"), "ANSWER_TOO_LARGE"
        with pytest.raises(ResourceExhaustedError) as refused:
            await _events(calls, too_large)
        assert refused.value.reason == reason
        assert (await nap)[-1] == "completed", "the stream's other call went on"
    finally:
        await calls.close()
        await channel.close()
        await execute.stop()


async def _events(calls: ExecuteStreams, request: pb.ExecuteRequest) -> list[str]:
    return [event.WhichOneof("payload") or "" async for event in calls.execute(request)]


async def test_streams_are_renewed_and_the_old_ones_end_with_their_calls(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiplex, "STREAM_LIFETIME", 0.0)
    channel = open_channel(stack.execute.target, max_message_bytes=16 << 20)
    calls = ExecuteStreams(channel, MethodMetrics(), max_message_bytes=16 << 20, streams=1)
    try:
        for n in range(5):
            assert (await _events(calls, step("core.echo", value=n)))[-1] == "completed"
    finally:
        await calls.close()
        await channel.close()
    stream_calls = stack.execute.metrics.messages("ExecutorService/ExecuteStream")
    [method] = stream_calls
    assert method.counts_by_code["OK"] >= 4, "each old stream ended as its last call ended, not cut off"


async def test_a_stopping_replica_gets_no_new_steps_while_another_serves(tmp_path: Path) -> None:
    replicas = [
        TierServer(service_for("execute", Settings(data_dir=tmp_path / name)), port=0, grace_seconds=30.0)
        for name in ("a", "b")
    ]
    for replica in replicas:
        await replica.start()
    target = ",".join(replica.target for replica in replicas)
    channel = open_channel(target, max_message_bytes=16 << 20)
    calls = ExecuteStreams(channel, MethodMetrics(), max_message_bytes=16 << 20, streams=1)
    stopping: asyncio.Task[None] | None = None
    try:
        nap = asyncio.create_task(_events(calls, step("core.sleep", seconds=3)))
        await wait_for(lambda: any(r.metrics.in_flight[EXECUTE] for r in replicas))
        [busy] = [r for r in replicas if r.metrics.in_flight[EXECUTE]]
        stopping = asyncio.create_task(busy.stop())
        await wait_for(lambda: busy.service._streams.stopping)  # type: ignore[attr-defined]
        outcomes = []
        for _ in range(5):
            try:
                outcomes.append((await _events(calls, step("core.echo", value="x")))[-1])
            except UnavailableError as refused:
                outcomes.append(refused.reason)
        assert outcomes[-1] == "completed" and outcomes.count("STOPPING") <= 1, outcomes
        assert not nap.done(), "the step in flight on the stopping replica still runs"
        assert (await nap)[-1] == "completed"
    finally:
        await calls.close()
        await channel.close()
        await (stopping or asyncio.sleep(0))
        for replica in replicas:
            await replica.stop()


async def test_a_stopping_orchestrate_ends_the_streams_of_watches_it_carried(tmp_path: Path) -> None:
    orchestrate = await start_tier("orchestrate", Settings(data_dir=tmp_path))
    channel = grpc.aio.insecure_channel(orchestrate.target)
    watches: Any = channel.stream_stream(
        "/tierstack.v1.OrchestratorService/WatchRuns",
        request_serializer=orchestrator_pb.WatchRunsRequest.SerializeToString,
        response_deserializer=orchestrator_pb.WatchRunsResponse.FromString,
    )()
    try:
        unknown = orchestrator_pb.WatchRunRequest(run_id="no-such-run")
        await watches.write(orchestrator_pb.WatchRunsRequest(call=1, watch=unknown))
        answer = await watches.read()
        assert from_status(answer.ended.code, answer.ended.message, answer.ended.details).code is Code.NOT_FOUND
        await orchestrate.stop()
        assert await watches.read() is grpc.aio.EOF, "the stream ended with the server, its watches done"
    finally:
        await channel.close()
