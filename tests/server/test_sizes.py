"""Sizes agree end to end: one message size on every hop, capped outputs, and runs any client can read."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers import HttpServer, Stack, open_stack, reply
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import FailedPreconditionError, OrchestratorClient
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import orchestrator_service_pb2 as pb

MiB = 1 << 20
#: More than gRPC's default 4 MiB message and than the default 1 MiB output cap.
BODY = b"x" * (5 * MiB)


def fetch(server: HttpServer) -> dict[str, Any]:
    """The arguments of an ``http.request`` of the 5 MB body, its size cap raised to let it through."""
    server.routes["/big"] = reply(BODY, content_type="text/plain")
    return {"url": f"{server.url}/big", "max_bytes": 8 * MiB}


def body(output: Any) -> Any:
    """The body of an ``http.request`` output."""
    fetched = from_value(output)
    assert isinstance(fetched, dict)
    return fetched["body"]


@pytest.fixture
async def roomy(data_dir: Path) -> AsyncIterator[Stack]:
    """A stack whose output cap lets the 5 MB body through, within the default message size."""
    async with open_stack(
        Settings(data_dir=data_dir, max_output_bytes=8 * MiB, max_run_output_bytes=8 * MiB)
    ) as opened:
        yield opened


async def test_a_step_output_over_the_cap_fails_the_step_and_the_run_stays_readable(
    stack: Stack, http_server: HttpServer
) -> None:
    wf = workflow(step("big", "http.request", **fetch(http_server)))
    wf.steps[0].retry.max_attempts = 3
    events = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    failed = events[-1].run_failed.error
    assert failed.reason == "OUTPUT_TOO_LARGE"
    assert str(MiB) in failed.message  # it names the cap
    assert [e.step_started.attempt for e in events if e.HasField("step_started")] == [1]  # not retried
    # A client with gRPC's default 4 MiB limit reads the run and its whole history.
    async with grpc.aio.insecure_channel(stack.orchestrate.target) as channel:
        client = OrchestratorClient(channel=channel)
        run = await client.get_run(events[0].run_id)
        history = [event async for event in client.watch_run(events[0].run_id)]
    assert run.state == pb.RUN_STATE_FAILED and run.steps[0].error.reason == "OUTPUT_TOO_LARGE"
    assert [event.sequence for event in history] == [event.sequence for event in events]


async def test_a_5_mb_http_body_comes_through_execute_tool_and_a_workflow_alike(
    roomy: Stack, http_server: HttpServer
) -> None:
    arguments = fetch(http_server)
    call = common_pb2.ToolCall(tool="http.request", arguments=to_struct(arguments))
    direct = await roomy.executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=call))
    assert not direct.result.HasField("error"), direct.result.error
    assert body(direct.result.output) == BODY.decode()
    request = pb.OrchestrateRequest(workflow=workflow(step("big", "http.request", **arguments)))
    events = [event async for event in roomy.orchestrator.orchestrate(request)]
    assert events[-1].HasField("run_completed"), events[-1]
    assert body(events[-1].run_completed.outputs["big"]) == BODY.decode()


async def test_the_basic_view_leaves_inputs_and_outputs_out(stack: Stack) -> None:
    wf = workflow(step("a", value="{{inputs.word}}"), step("b", depends_on=("a",), value=[1, 2]))
    request = pb.OrchestrateRequest(workflow=wf, inputs=to_struct({"word": "hello"}))
    events = [event async for event in stack.orchestrator.orchestrate(request)]
    run_id = events[0].run_id
    full = await stack.orchestrator.get_run(run_id)
    assert from_value(full.outputs["a"]) == "hello" and from_value(full.steps[1].output) == [1, 2]
    basic = await stack.orchestrator.get_run(run_id, view=pb.RUN_VIEW_BASIC)
    assert not basic.outputs and not basic.HasField("inputs")
    assert [(s.step_id, s.state, s.HasField("output")) for s in basic.steps] == [
        ("a", pb.STEP_STATE_COMPLETED, False),
        ("b", pb.STEP_STATE_COMPLETED, False),
    ]
    assert (basic.state, basic.last_sequence) == (full.state, full.last_sequence)
    listed = await stack.orchestrator.list_runs()  # basic unless asked
    assert listed.runs[0].run_id == run_id and not listed.runs[0].outputs
    listed = await stack.orchestrator.list_runs(pb.ListRunsRequest(view=pb.RUN_VIEW_FULL))
    assert listed.runs[0] == full


async def test_outputs_too_large_together_fail_the_run_and_its_full_view_is_refused(data_dir: Path) -> None:
    # Five steps of 0.9 MiB each fit the output cap, but not a 4 MiB message together.
    settings = Settings(data_dir=data_dir, max_message_bytes=4 * MiB)
    steps = [step(f"s{i}", value="{{inputs.blob}}") for i in range(5)]
    inputs = to_struct({"blob": "y" * (9 * MiB // 10)})
    request = pb.StartRunRequest(request_id="big", workflow=workflow(*steps), inputs=inputs)
    async with open_stack(settings) as stack:
        run_id = (await stack.orchestrator.start_run(request)).run.run_id
        events = [event async for event in stack.orchestrator.watch_run(run_id)]
        assert events[-1].run_failed.error.reason == "OUTPUT_TOO_LARGE"
        assert str(2 * MiB) in events[-1].run_failed.error.message  # half the message size
        with pytest.raises(FailedPreconditionError) as refused:
            await stack.orchestrator.get_run(run_id)
        assert refused.value.reason == "RUN_TOO_LARGE" and "RUN_VIEW_BASIC" in refused.value.message
        with pytest.raises(FailedPreconditionError):
            await stack.orchestrator.list_runs(pb.ListRunsRequest(view=pb.RUN_VIEW_FULL))
        basic = await stack.orchestrator.get_run(run_id, view=pb.RUN_VIEW_BASIC)
        assert basic.state == pb.RUN_STATE_FAILED
        assert {s.state for s in basic.steps} == {pb.STEP_STATE_COMPLETED}
        # Starting it again answers with the run as it is, in the basic view since the full one cannot fit.
        again = await stack.orchestrator.start_run(request)
        assert not again.created and again.run == basic


async def test_a_nested_workflow_whose_output_is_over_the_cap_fails_its_step(stack: Stack) -> None:
    # Each inner step fits the 1 MiB cap; the nested step's output, both of them, does not.
    inner = workflow(step("x", value="{{inputs.blob}}"), step("y", value="{{inputs.blob}}"), name="inner")
    inner.inputs.add(name="blob", type=pb.INPUT_TYPE_STRING, required=True)
    outer = workflow(pb.WorkflowStep(id="sub", workflow=inner, parameters=to_struct({"blob": "{{inputs.blob}}"})))
    outer.steps[0].retry.max_attempts = 3
    request = pb.OrchestrateRequest(workflow=outer, inputs=to_struct({"blob": "z" * (6 * MiB // 10)}))
    events = [event async for event in stack.orchestrator.orchestrate(request)]
    failed = [e.step_failed for e in events if e.HasField("step_failed")]
    assert [(f.step_id, f.error.reason, f.error.tier) for f in failed] == [
        ("sub", "OUTPUT_TOO_LARGE", common_pb2.TIER_ORCHESTRATE)
    ]
    assert not any(e.HasField("step_retried") for e in events)


async def test_a_step_whose_request_cannot_fit_a_message_fails_without_retries(stack: Stack) -> None:
    # The arguments, rendered, repeat a 0.9 MiB input twenty times: more than a 16 MiB message.
    wf = workflow(step("a", value=["{{inputs.blob}}"] * 20))
    wf.steps[0].retry.max_attempts = 3
    request = pb.OrchestrateRequest(workflow=wf, inputs=to_struct({"blob": "y" * (9 * MiB // 10)}))
    events = [event async for event in stack.orchestrator.orchestrate(request)]
    failed = [e.step_failed.error for e in events if e.HasField("step_failed")]
    assert [(error.reason, error.tier) for error in failed] == [("REQUEST_TOO_LARGE", common_pb2.TIER_ORCHESTRATE)]
    assert str(16 * MiB) in failed[0].message
    assert not any(e.HasField("step_retried") for e in events)


async def test_a_goal_whose_outputs_are_too_large_together_fails(data_dir: Path, http_server: HttpServer) -> None:
    # Four fetches of 0.6 MiB each fit every cap alone, but not a 2 MiB message together.
    http_server.routes["/part"] = reply(b"p" * (6 * MiB // 10), content_type="text/plain")
    goal = " and ".join(f"fetch {http_server.url}/part" for _ in range(4))
    agents = [coordinator_pb.Agent(id="scout", capabilities=["http"], max_concurrent_tasks=4)]
    async with open_stack(Settings(data_dir=data_dir, max_message_bytes=2 * MiB)) as stack:
        request = coordinator_pb.CoordinateRequest(goal=goal, agents=agents)
        events = [event async for event in stack.coordinator.coordinate(request)]
    finished = [e.subtask_finished for e in events if e.HasField("subtask_finished")]
    assert len(finished) == 4 and all(f.success for f in finished)
    error = events[-1].goal_failed.error
    assert (error.reason, error.tier) == ("OUTPUT_TOO_LARGE", common_pb2.TIER_COORDINATE)
    assert str(MiB) in error.message


def test_the_message_size_comes_from_the_environment() -> None:
    settings = Settings.from_env("execute", {"TIERSTACK_MAX_MESSAGE_BYTES": str(32 * MiB)})
    assert settings == dataclasses.replace(Settings.from_env("execute", {}), max_message_bytes=32 * MiB)
    assert settings.max_total_output_bytes == 3 * MiB  # readable by a client with gRPC's default limit
    small = Settings.from_env("execute", {"TIERSTACK_MAX_MESSAGE_BYTES": str(2 * MiB)})
    assert small.max_total_output_bytes == MiB
    roomy = Settings.from_env("execute", {"TIERSTACK_MAX_RUN_OUTPUT_BYTES": str(8 * MiB)})
    assert roomy.max_total_output_bytes == 8 * MiB
