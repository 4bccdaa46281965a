"""OrchestratorService through the SDK, against a real Execute server and real HTTP endpoints."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import HttpServer, Stack, registry_of, reply, start_tier, wait_for
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import (
    FailedPreconditionError,
    InvalidArgumentError,
    MonitorClient,
    NotFoundError,
    OrchestratorClient,
    UnavailableError,
)
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server import Settings
from tierstack.server.execute import tool
from tierstack.v1 import common_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb


def hold_until_released(http_server: HttpServer, path: str) -> threading.Event:
    """Makes ``path`` answer only once the returned event is set."""
    release = threading.Event()

    def hold(request: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        reply(b"{}")(request)

    http_server.routes[path] = hold
    return release


async def test_orchestrate_streams_a_run_to_completion(stack: Stack) -> None:
    wf = workflow(
        step("greet", "text.template", template="Hello {{ who }}", variables={"who": "{{inputs.city}}"}),
        step("count", "json.query", data=[1, 2, 3], expression="length(@)"),
        step(
            "combine",
            "json.query",
            depends_on=("greet", "count"),
            data={"g": "{{steps.greet.output}}", "n": "{{steps.count.output}}"},
            expression="join(' x', [g, to_string(n)])",
        ),
    )
    request = pb.OrchestrateRequest(
        workflow=wf, inputs=to_struct({"city": "Lisbon"}), verbosity=pb.RUN_VERBOSITY_PROGRESS
    )
    events = [event async for event in stack.orchestrator.orchestrate(request)]
    kinds = [event.WhichOneof("payload") for event in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_completed"
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert len({event.run_id for event in events}) == 1
    assert len({event.correlation_id for event in events}) == 1
    # Tier 3's own events travel inside Tier 2's stream, carrying the same correlation id.
    forwarded = [event.step_execution.event for event in events if event.HasField("step_execution")]
    assert {event.correlation_id for event in forwarded} == {events[0].correlation_id}
    completed_at = {e.step_completed.step_id: i for i, e in enumerate(events) if e.HasField("step_completed")}
    started_at = {e.step_started.step_id: i for i, e in enumerate(events) if e.HasField("step_started")}
    assert started_at["combine"] > max(completed_at["greet"], completed_at["count"])
    outputs = {key: from_value(value) for key, value in events[-1].run_completed.outputs.items()}
    assert outputs == {"greet": "Hello Lisbon", "count": 3, "combine": "Hello Lisbon x3"}

    run = await stack.orchestrator.get_run(events[0].run_id)
    assert run.state == pb.RUN_STATE_COMPLETED
    assert {s.step_id: s.state for s in run.steps} == dict.fromkeys(outputs, pb.STEP_STATE_COMPLETED)


async def test_independent_steps_run_at_the_same_time(stack: Stack, http_server: HttpServer) -> None:
    # Each request waits at a barrier for the other: run one after the other, both would fail.
    barrier = threading.Barrier(2, timeout=10)

    def meet(request: BaseHTTPRequestHandler) -> None:
        barrier.wait()
        reply(b'{"met": true}')(request)

    http_server.routes["/meet"] = meet
    wf = workflow(
        step("left", "http.request", url=f"{http_server.url}/meet"),
        step("right", "http.request", url=f"{http_server.url}/meet"),
    )
    events = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    for name in ("left", "right"):
        output = from_value(events[-1].run_completed.outputs[name])
        assert isinstance(output, dict) and output["json"] == {"met": True}


async def test_a_malformed_workflow_is_rejected_with_field_details(stack: Stack) -> None:
    wf = workflow(step("a", depends_on=("b",)), step("b", depends_on=("a",)), step("c", depends_on=("nope",)))
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.start_run(pb.StartRunRequest(workflow=wf))
    assert caught.value.reason == "INVALID_WORKFLOW"
    assert {(v.field, v.description) for v in caught.value.violations} == {
        ("workflow.steps[2].depends_on[0]", "unknown step 'nope'"),
        ("workflow.steps", "dependency cycle: a -> b -> a"),
    }
    with pytest.raises(InvalidArgumentError):
        _ = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    listing = await stack.orchestrator.list_runs()
    assert list(listing.runs) == []


async def test_validate_and_plan_a_workflow(stack: Stack) -> None:
    bad = await stack.orchestrator.validate_workflow(workflow(step("a", depends_on=("a",))))
    assert not bad.valid
    assert [(v.field, v.description) for v in bad.violations] == [
        ("workflow.steps[0].depends_on[0]", "step 'a' depends on itself")
    ]
    wf = workflow(
        step("a"),
        step("b", depends_on=("a",)),
        step("c", depends_on=("a",)),
        step("d", depends_on=("b", "c")),
    )
    assert (await stack.orchestrator.validate_workflow(wf)).valid
    first = await stack.orchestrator.plan_workflow(wf)
    second = await stack.orchestrator.plan_workflow(wf)
    assert (first.cached, second.cached) == (False, True)
    assert [list(batch.step_ids) for batch in first.plan.batches] == [["a"], ["b", "c"], ["d"]]
    assert first.plan.max_parallelism == 2
    assert first.plan.critical_path[0] == "a" and first.plan.critical_path[-1] == "d"
    assert first.plan.workflow_hash == second.plan.workflow_hash


async def test_start_run_is_idempotent_by_request_id(stack: Stack) -> None:
    request = pb.StartRunRequest(request_id="order-42", workflow=workflow(step("a", value=1)))
    first = await stack.orchestrator.start_run(request)
    again = await stack.orchestrator.start_run(request)
    assert first.created and not again.created
    assert first.run.run_id == again.run.run_id
    assert len((await stack.orchestrator.list_runs()).runs) == 1


async def test_watch_run_replays_from_any_sequence(stack: Stack) -> None:
    started = await stack.orchestrator.start_run(
        pb.StartRunRequest(workflow=workflow(step("a", value=1), step("b", value=2)))
    )
    run_id = started.run.run_id
    everything = [event async for event in stack.orchestrator.watch_run(run_id)]
    assert everything[-1].HasField("run_completed")
    tail = [event async for event in stack.orchestrator.watch_run(run_id, after_sequence=3)]
    assert [event.sequence for event in tail] == [event.sequence for event in everything[3:]]
    assert tail == everything[3:]


async def test_watch_of_an_unknown_run_is_not_found(stack: Stack) -> None:
    with pytest.raises(NotFoundError):
        _ = [event async for event in stack.orchestrator.watch_run("missing")]
    with pytest.raises(NotFoundError):
        await stack.orchestrator.get_run("missing")


async def test_list_runs_pages_newest_first(stack: Stack) -> None:
    run_ids = []
    for value in range(5):
        started = await stack.orchestrator.start_run(pb.StartRunRequest(workflow=workflow(step("a", value=value))))
        run_ids.append(started.run.run_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await stack.orchestrator.list_runs(pb.ListRunsRequest(page_size=2, page_token=token))
        seen.extend(run.run_id for run in page.runs)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(run_ids))
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.list_runs(pb.ListRunsRequest(page_token="not-a-token"))
    assert caught.value.violations[0].field == "page_token"


async def test_cancel_run_stops_the_tool_in_flight(stack: Stack, http_server: HttpServer) -> None:
    release = hold_until_released(http_server, "/slow")
    try:
        wf = workflow(step("slow", "http.request", url=f"{http_server.url}/slow"), step("after", depends_on=("slow",)))
        started = await stack.orchestrator.start_run(pb.StartRunRequest(workflow=wf))
        await wait_for(lambda: "/slow" in http_server.hits)
        run = await stack.orchestrator.cancel_run(started.run.run_id, reason="changed my mind")
    finally:
        release.set()
    assert run.state == pb.RUN_STATE_CANCELLED
    assert {s.step_id: s.state for s in run.steps} == {
        "slow": pb.STEP_STATE_CANCELLED,
        "after": pb.STEP_STATE_PENDING,
    }
    history = [event async for event in stack.orchestrator.watch_run(run.run_id)]
    assert history[-1].run_cancelled.reason == "changed my mind"
    async with MonitorClient(stack.execute.target) as monitor:
        metrics = await monitor.get_metrics("ExecutorService/Execute")
    await_codes = metrics.tiers[0].methods[0].counts_by_code
    assert await_codes["CANCELLED"] == 1
    with pytest.raises(FailedPreconditionError):
        await stack.orchestrator.cancel_run(run.run_id)


async def test_a_run_past_its_max_duration_fails_and_its_steps_are_stopped(stack: Stack) -> None:
    wf = workflow(step("nap", "core.sleep", seconds=60), step("after", depends_on=("nap",)))
    limits = common_pb2.ResourceLimits(max_duration=duration_pb2.Duration(nanos=300_000_000))
    events = [e async for e in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf, limits=limits))]
    assert events[-1].run_failed.error.reason == "DEADLINE_EXCEEDED", events[-1]
    run = await stack.orchestrator.get_run(events[-1].run_id)
    assert run.state == pb.RUN_STATE_FAILED
    assert {s.step_id: s.state for s in run.steps} == {"nap": pb.STEP_STATE_CANCELLED, "after": pb.STEP_STATE_PENDING}
    async with MonitorClient(stack.execute.target) as monitor:  # and stopped at Tier 3, not left to sleep
        for _ in range(500):
            metrics = await monitor.get_metrics("ExecutorService/CancelExecution")
            if metrics.tiers[0].methods:
                break
            await asyncio.sleep(0.01)
    assert metrics.tiers[0].methods[0].counts_by_code["OK"] == 1


async def test_every_failed_attempt_is_charged_to_the_run(stack: Stack) -> None:
    broken = step("broken", "json.query", data=[], expression="[?")
    broken.retry.CopyFrom(pb.RetryPolicy(max_attempts=3, initial_backoff=duration_pb2.Duration(nanos=1_000_000)))
    events = [e async for e in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=workflow(broken)))]
    retried = [e.step_retried.usage.tool_calls for e in events if e.HasField("step_retried")]
    failed = [e.step_failed.usage.tool_calls for e in events if e.HasField("step_failed")]
    assert (retried, failed) == ([1, 1], [1])
    assert events[-1].run_failed.usage.tool_calls == 3


async def test_a_failed_step_fails_the_run_and_cancels_the_rest(stack: Stack, http_server: HttpServer) -> None:
    release = hold_until_released(http_server, "/slow")
    try:
        wf = workflow(
            step("slow", "http.request", url=f"{http_server.url}/slow"),
            step("broken", "json.query", data=[], expression="[?"),
            step("never", depends_on=("broken",)),
        )
        events = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    finally:
        release.set()
    assert events[-1].run_failed.error.reason == "INVALID_EXPRESSION"
    assert events[-1].run_failed.error.metadata["step_id"] == "broken"
    run = await stack.orchestrator.get_run(events[-1].run_id)
    assert run.state == pb.RUN_STATE_FAILED
    assert {s.step_id: s.state for s in run.steps} == {
        "slow": pb.STEP_STATE_CANCELLED,
        "broken": pb.STEP_STATE_FAILED,
        "never": pb.STEP_STATE_PENDING,
    }


async def test_a_missing_input_fails_the_step_with_the_template_path(stack: Stack) -> None:
    wf = workflow(step("a", value="{{inputs.city}}"))
    events = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    error = events[-1].run_failed.error
    assert error.reason == "TEMPLATE_ERROR"
    assert error.metadata["field"] == "parameters.value"


async def test_an_unreachable_executor_is_reported_before_the_run_starts(data_dir: Path) -> None:
    orchestrate = await start_tier("orchestrate", Settings(execute_target="127.0.0.1:1", data_dir=data_dir))
    try:
        async with OrchestratorClient(orchestrate.target) as client:
            with pytest.raises(UnavailableError):
                await client.start_run(pb.StartRunRequest(workflow=workflow(step("a"))))
            assert list((await client.list_runs()).runs) == []
    finally:
        await orchestrate.stop()


async def test_pause_resume_and_resolve_through_the_sdk(stack: Stack, http_server: HttpServer) -> None:
    release = hold_until_released(http_server, "/slow")
    wf = pb.Workflow(
        name="paused",
        variables={"where": "{{inputs.city}} via {{steps.first.output}}"},
        steps=[
            step("first", value="one"),
            step("slow", "http.request", depends_on=("first",), url=f"{http_server.url}/slow"),
        ],
    )
    started = await stack.orchestrator.start_run(pb.StartRunRequest(workflow=wf, inputs=to_struct({"city": "Oslo"})))
    run_id = started.run.run_id
    await wait_for(lambda: "/slow" in http_server.hits)
    paused = await stack.orchestrator.pause_run(run_id, reason="deploy")
    assert paused.state == pb.RUN_STATE_PAUSED
    assert await stack.orchestrator.resolve_variables(run_id, ["inputs.city", "vars.where", "steps.first.output"]) == [
        "Oslo",
        "Oslo via one",
        "one",
    ]
    with pytest.raises(FailedPreconditionError):
        await stack.orchestrator.pause_run(run_id)
    release.set()
    resumed = await stack.orchestrator.resume_run(run_id)
    assert resumed.state == pb.RUN_STATE_RUNNING
    history = [event async for event in stack.orchestrator.watch_run(run_id)]
    assert history[-1].HasField("run_completed")
    with pytest.raises(FailedPreconditionError):
        await stack.orchestrator.resume_run(run_id)


async def test_two_resumes_at_once_drive_the_run_once(stack: Stack, http_server: HttpServer) -> None:
    release = hold_until_released(http_server, "/held")
    wf = workflow(step("held", "http.request", url=f"{http_server.url}/held"))
    run_id = (await stack.orchestrator.start_run(pb.StartRunRequest(workflow=wf))).run.run_id
    await wait_for(lambda: http_server.hits.count("/held") == 1)
    await stack.orchestrator.pause_run(run_id)
    outcomes = await asyncio.gather(
        stack.orchestrator.resume_run(run_id), stack.orchestrator.resume_run(run_id), return_exceptions=True
    )
    resumed = [outcome for outcome in outcomes if isinstance(outcome, pb.Run)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, FailedPreconditionError)]
    assert len(resumed) == 1 and len(refused) == 1, outcomes
    assert refused[0].reason == "RUN_NOT_PAUSED"
    await wait_for(lambda: http_server.hits.count("/held") == 2)
    release.set()
    history = [event async for event in stack.orchestrator.watch_run(run_id)]
    assert history[-1].HasField("run_completed")
    assert [event.sequence for event in history] == list(range(1, len(history) + 1))
    assert sum(event.HasField("run_resumed") for event in history) == 1
    assert sum(event.HasField("step_completed") for event in history) == 1
    assert http_server.hits.count("/held") == 2  # once before the pause, once after the one resume


async def test_unknown_tools_are_rejected_before_the_run(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.start_run(pb.StartRunRequest(workflow=workflow(step("a", "no.such.tool"))))
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("workflow.steps[0].tool", "unknown tool 'no.such.tool'; ListTools names the registered tools")
    ]


_IDS = st.sampled_from(["a", "b", "c", "d", "", "1x", "a b"])
_TEMPLATES = st.sampled_from(
    ["{{steps.a.output}}", "{{steps.zz.output}}", "{{inputs.x}}", "{{vars.v}}", "{{steps.b}}", "{{inputs..x}}", "plain"]
)


@st.composite
def messy_workflows(draw: st.DrawFn) -> pb.Workflow:
    """Workflows of every sort of badness (and some that are fine)."""
    steps = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        wf_step = pb.WorkflowStep(
            id=draw(_IDS),
            tool=draw(st.sampled_from(["core.echo", "", "nope"])),
            depends_on=draw(st.lists(_IDS, max_size=3)),
            when=draw(st.sampled_from(["", "inputs.x", "steps.a.output == `1`", "(((", "vars.v"])),
        )
        wf_step.parameters.update({"value": draw(_TEMPLATES)})
        steps.append(wf_step)
    return pb.Workflow(name="messy", steps=steps, variables=draw(st.dictionaries(_IDS, _TEMPLATES, max_size=2)))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(messy_workflows())
def test_random_workflows_are_accepted_or_invalid_never_internal(tmp_path: Path, wf: pb.Workflow) -> None:
    async def scenario() -> None:
        execute = await start_tier("execute", Settings())
        orchestrate = await start_tier("orchestrate", Settings(execute_target=execute.target, data_dir=tmp_path))
        try:
            async with OrchestratorClient(orchestrate.target) as client:
                try:
                    await client.start_run(pb.StartRunRequest(workflow=wf))
                except InvalidArgumentError as exc:
                    assert exc.violations, "an INVALID_ARGUMENT names its fields"
                    return
                ids = [s.id for s in wf.steps]
                # Accepted: then it was well formed.
                assert ids and len(set(ids)) == len(ids) and all(s.tool == "core.echo" for s in wf.steps)
        finally:
            await orchestrate.stop()
            await execute.stop()

    asyncio.run(scenario())


async def test_a_caller_leaving_orchestrate_cancels_its_run(stack: Stack, http_server: HttpServer) -> None:
    release = hold_until_released(http_server, "/slow")
    try:
        wf = workflow(step("slow", "http.request", url=f"{http_server.url}/slow"))
        stream = stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))
        first = await anext(stream)
        await wait_for(lambda: "/slow" in http_server.hits)
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(500):
            run = await stack.orchestrator.get_run(first.run_id)
            if run.state == pb.RUN_STATE_CANCELLED:
                break
            await asyncio.sleep(0.01)
    finally:
        release.set()
    assert run.state == pb.RUN_STATE_CANCELLED
    assert [s.state for s in run.steps] == [pb.STEP_STATE_CANCELLED]


async def test_a_run_followed_through_orchestrate_survives_a_restart(data_dir: Path, http_server: HttpServer) -> None:
    release = hold_until_released(http_server, "/slow")
    execute = await start_tier("execute", Settings(data_dir=data_dir))
    settings = Settings(execute_target=execute.target, data_dir=data_dir)
    try:
        first = await start_tier("orchestrate", settings)
        client = OrchestratorClient(first.target)
        wf = workflow(step("slow", "http.request", url=f"{http_server.url}/slow"), step("after", depends_on=("slow",)))
        stream = client.orchestrate(pb.OrchestrateRequest(workflow=wf))
        run_id = (await anext(stream)).run_id
        await wait_for(lambda: "/slow" in http_server.hits)
        await first.stop()  # the attached caller loses its stream; the run must not be cancelled for it
        await client.close()
        release.set()
        second = await start_tier("orchestrate", settings)
        try:
            async with OrchestratorClient(second.target) as again:
                history = [event async for event in again.watch_run(run_id)]
        finally:
            await second.stop()
    finally:
        release.set()
        await execute.stop()
    kinds = [event.WhichOneof("payload") for event in history]
    assert "run_resumed" in kinds and kinds[-1] == "run_completed"
    assert "run_cancelled" not in kinds


async def test_a_run_records_each_steps_start_and_end_unless_it_asks_for_progress(stack: Stack) -> None:
    wf = workflow(step("a", "core.echo", value=1), step("b", "core.echo", depends_on=("a",), value=2))
    events = [e async for e in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    assert [e.WhichOneof("payload") for e in events] == [
        "run_started",
        *("step_started", "step_completed") * 2,
        "run_completed",
    ]
    assert (await stack.orchestrator.get_run(events[0].run_id)).verbosity == pb.RUN_VERBOSITY_STEPS
    verbose = [
        e
        async for e in stack.orchestrator.orchestrate(
            pb.OrchestrateRequest(workflow=wf, verbosity=pb.RUN_VERBOSITY_PROGRESS)
        )
    ]
    forwarded = {e.step_execution.event.WhichOneof("payload") for e in verbose if e.HasField("step_execution")}
    assert forwarded == {"started", "strategy_selected", "tool_call_started", "tool_call_finished"}


async def test_a_watcher_sees_only_the_kinds_of_event_it_asks_for(stack: Stack) -> None:
    wf = workflow(step("a", "core.echo", value=1), step("b", "core.echo", depends_on=("a",), value=2))
    run = (await stack.orchestrator.start_run(pb.StartRunRequest(workflow=wf))).run
    ends = [e async for e in stack.orchestrator.watch_run(run.run_id, kinds=["step_completed", "run_completed"])]
    assert [(e.WhichOneof("payload"), e.step_completed.step_id) for e in ends] == [
        ("step_completed", "a"),
        ("step_completed", "b"),
        ("run_completed", ""),
    ]
    with pytest.raises(InvalidArgumentError) as caught:
        _ = [e async for e in stack.orchestrator.watch_run(run.run_id, kinds=["step_completed", "x" * 100])]
    assert [v.field for v in caught.value.violations] == ["kinds[1]"]
    assert "x" * 41 not in caught.value.violations[0].description  # the name is quoted short


async def test_a_step_waiting_for_approval_is_shown_to_the_runs_watcher_whatever_its_verbosity(stack: Stack) -> None:
    @tool("bank.transfer", needs_approval=True)
    async def transfer(amount: float) -> JSON:
        return {"sent": amount}

    registry_of(stack.execute).register(transfer)
    wf = workflow(step("pay", "bank.transfer", amount=5))
    events = []
    async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf)):  # RUN_VERBOSITY_STEPS
        events.append(event)
        if event.step_execution.event.HasField("approval_required"):
            await stack.executor.approve_tool_call(event.step_execution.event.approval_required.approval_id)
    assert [e.step_execution.event.WhichOneof("payload") for e in events if e.HasField("step_execution")] == [
        "approval_required"
    ]
    assert from_value(events[-1].run_completed.outputs["pay"]) == {"sent": 5}


async def test_a_workflow_step_can_run_a_model_strategy(stack: Stack) -> None:
    prompt_step = pb.WorkflowStep(
        id="ask",
        tool="core.echo",
        strategy=common_pb2.STRATEGY_CONVERSATIONAL,
        prompt='use core.echo with {"value": "{{inputs.word}}"}',
    )
    events = [
        e
        async for e in stack.orchestrator.orchestrate(
            pb.OrchestrateRequest(
                workflow=workflow(prompt_step),
                inputs=to_struct({"word": "hello"}),
                verbosity=pb.RUN_VERBOSITY_PROGRESS,
            )
        )
    ]
    assert from_value(events[-1].run_completed.outputs["ask"]) == 'use core.echo with {"value": "hello"}\n- "hello"'
    selected = [e.step_execution.event.strategy_selected for e in events if e.HasField("step_execution")]
    assert [s.chosen for s in selected if s.chosen] == [common_pb2.STRATEGY_CONVERSATIONAL]
    no_prompt = pb.WorkflowStep(id="ask", tool="core.echo", strategy=common_pb2.STRATEGY_REASONING)
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.start_run(pb.StartRunRequest(workflow=workflow(no_prompt)))
    assert [v.field for v in caught.value.violations] == ["workflow.steps[0].prompt"]


async def test_health_is_answered_while_a_large_workflow_is_checked(stack: Stack) -> None:
    chain = workflow(
        *(step(f"s{i}", depends_on=(f"s{i - 1}",) if i else (), value=f"{{{{inputs.x}}}} {i}") for i in range(10_000))
    )
    # Six nested chains: 60,000 steps in 3.8 MB, a check that takes a while even in linear time.
    large = pb.Workflow(name="large", steps=[pb.WorkflowStep(id=f"n{k}", workflow=chain) for k in range(6)])
    validating = asyncio.create_task(stack.orchestrator.validate_workflow(large))
    await asyncio.sleep(0.2)  # the request is on its way and being checked
    channel = grpc.aio.insecure_channel(stack.orchestrate.target)
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await channel.close()
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert not validating.done()
    assert (await validating).valid


async def test_a_finished_run_replays_its_whole_history_page_by_page(stack: Stack) -> None:
    wf = workflow(*(step(f"s{index}", value=index) for index in range(40)))  # more events than a page
    streamed = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
    assert len(streamed) > 64
    replayed = [event async for event in stack.orchestrator.watch_run(streamed[0].run_id)]
    assert replayed == streamed
    later = [event async for event in stack.orchestrator.watch_run(streamed[0].run_id, after_sequence=70)]
    assert later == streamed[70:]
