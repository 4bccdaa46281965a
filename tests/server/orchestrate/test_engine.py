"""The run manager in process, over the real executor engine and the in-memory store."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.helpers import wait_for
from tests.server.orchestrate.workflows import dags, step, workflow
from tierstack.core.errors import FailedPreconditionError, InvalidArgumentError
from tierstack.core.values import JSON, from_value, to_struct, to_value
from tierstack.server.execute import Executor, Tool, ToolContext, ToolError, ToolRegistry, ToolSource
from tierstack.server.orchestrate import MemoryRunStore, RunManager
from tierstack.v1 import common_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb


@dataclass
class Tools:
    """Python tools that let a test see what ran, make steps fail, or hold them."""

    log: list[tuple[str, str]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def track(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        self.log.append(("start", arguments["id"]))
        for _ in range(random.randrange(3)):
            await asyncio.sleep(0)
        self.log.append(("finish", arguments["id"]))
        return arguments["id"]  # type: ignore[no-any-return]

    async def flaky(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        key = arguments["key"]
        self.failures[key] += 1
        if self.failures[key] <= arguments["failures"]:
            raise ToolError("FLAKY", f"failure {self.failures[key]} of {key}")
        return "ok"

    async def hold(self, arguments: dict[str, Any], context: ToolContext) -> JSON:
        self.log.append(("start", arguments["id"]))
        await self.gate.wait()
        return arguments["id"]  # type: ignore[no-any-return]


def registry(tools: Tools) -> ToolRegistry:
    found = ToolRegistry()
    schema = {"type": "object"}
    for name, handler in (("test.track", tools.track), ("test.flaky", tools.flaky), ("test.hold", tools.hold)):
        found.register(Tool(name=name, description=name, parameters=schema, handler=handler, source=ToolSource.PYTHON))
    found.register(Tool(name="core.echo", description="echo", parameters=schema, handler=_echo))
    return found


async def _echo(arguments: dict[str, Any], context: ToolContext) -> JSON:
    value: JSON = arguments.get("value")
    return value


class Engine:
    """A run manager wired to an in-process executor, with helpers to run and inspect workflows."""

    def __init__(self, tools: Tools, store: MemoryRunStore | None = None) -> None:
        self.tools = tools
        self.store = store if store is not None else MemoryRunStore()
        self.manager = RunManager(self.store, Executor(registry(tools)))

    async def start(
        self, wf: pb.Workflow, *, durability: pb.RunDurability.ValueType = pb.RUN_DURABILITY_ASYNC, **inputs: Any
    ) -> pb.Run:
        run, _ = await self.manager.start_run(
            workflow=wf,
            inputs=to_struct(inputs),
            limits=common_pb2.ResourceLimits(),
            context=common_pb2.RequestContext(),
            durability=durability,
            verbosity=pb.RUN_VERBOSITY_PROGRESS,  # Tier 3's events too: the tests read their execution ids
        )
        return run

    async def run(self, wf: pb.Workflow, **inputs: Any) -> tuple[pb.Run, list[pb.RunEvent]]:
        run = await self.start(wf, **inputs)
        events = [event async for event in self.manager.watch(run.run_id)]
        return await self.manager.get_run(run.run_id), events


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    built = Engine(Tools())
    await built.manager.open()
    yield built
    await built.manager.close()


def states(run: pb.Run) -> dict[str, str]:
    return {s.step_id: pb.StepState.Name(s.state).removeprefix("STEP_STATE_") for s in run.steps}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_every_step_runs_once_after_all_its_dependencies(graph: list[tuple[str, tuple[str, ...]]]) -> None:
    async def scenario() -> list[tuple[str, str]]:
        built = Engine(Tools())
        await built.manager.open()
        try:
            wf = workflow(*(step(sid, "test.track", depends_on=deps, id=sid) for sid, deps in graph))
            run, events = await built.run(wf)
            assert run.state == pb.RUN_STATE_COMPLETED, run.error
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        finally:
            await built.manager.close()
        return built.tools.log

    log = asyncio.run(scenario())
    position = {(kind, sid): index for index, (kind, sid) in enumerate(log)}
    assert Counter(kind for kind, _ in log) == {"start": len(graph), "finish": len(graph)}
    for sid, deps in graph:
        assert all(position[("finish", dep)] < position[("start", sid)] for dep in deps)


async def test_when_optional_and_skips(engine: Engine) -> None:
    wf = workflow(
        pb.WorkflowStep(
            id="maybe", tool="test.flaky", optional=True, parameters=to_struct({"key": "m", "failures": 9})
        ),
        step("after_maybe", depends_on=("maybe",), value=1),
        pb.WorkflowStep(id="gated", tool="core.echo", when="inputs.go == `true`"),
        step("after_gated", depends_on=("gated",), value=2),
        step("free", value=3),
    )
    run, events = await engine.run(wf, go=False)
    assert run.state == pb.RUN_STATE_COMPLETED
    assert states(run) == {
        "maybe": "FAILED",
        "after_maybe": "SKIPPED",
        "gated": "SKIPPED",
        "after_gated": "SKIPPED",
        "free": "COMPLETED",
    }
    reasons = {e.step_skipped.step_id: e.step_skipped.reason for e in events if e.HasField("step_skipped")}
    assert reasons == {
        "after_maybe": "dependency 'maybe' did not complete",
        "gated": "its `when` condition is false",
        "after_gated": "dependency 'gated' did not complete",
    }
    assert {k: from_value(v) for k, v in run.outputs.items()} == {"free": 3}
    rerun, _ = await engine.run(wf, go=True)
    assert states(rerun)["after_gated"] == "COMPLETED"


async def test_retries_back_off_and_use_a_new_idempotency_key(engine: Engine) -> None:
    policy = pb.RetryPolicy(max_attempts=3)
    policy.initial_backoff.FromMilliseconds(1)
    wf = workflow(
        pb.WorkflowStep(id="s", tool="test.flaky", retry=policy, parameters=to_struct({"key": "k", "failures": 2}))
    )
    run, events = await engine.run(wf)
    assert run.state == pb.RUN_STATE_COMPLETED
    assert run.steps[0].attempt == 3
    retried = [e.step_retried for e in events if e.HasField("step_retried")]
    assert [(r.attempt, r.error.reason) for r in retried] == [(1, "FLAKY"), (2, "FLAKY")]
    keys = {e.step_execution.event.execution_id for e in events if e.HasField("step_execution")}
    assert keys == {f"{run.run_id}/s/{attempt}" for attempt in (1, 2, 3)}

    exhausted, _ = await engine.run(
        workflow(
            pb.WorkflowStep(id="s", tool="test.flaky", retry=policy, parameters=to_struct({"key": "x", "failures": 5}))
        )
    )
    assert exhausted.state == pb.RUN_STATE_FAILED
    assert (exhausted.steps[0].attempt, exhausted.error.reason) == (3, "FLAKY")


async def test_the_longest_retry_policy_allowed_backs_off_without_overflow(engine: Engine) -> None:
    policy = pb.RetryPolicy(max_attempts=100, backoff_multiplier=10)  # the bounds' maxima
    policy.initial_backoff.FromNanoseconds(1)
    policy.max_backoff.FromMilliseconds(1)
    wf = workflow(
        pb.WorkflowStep(id="s", tool="test.flaky", retry=policy, parameters=to_struct({"key": "y", "failures": 100}))
    )
    run, events = await engine.run(wf)
    assert (run.state, run.steps[0].attempt, run.error.reason) == (pb.RUN_STATE_FAILED, 100, "FLAKY")
    assert sum(e.HasField("step_retried") for e in events) == 99


async def test_a_nested_workflow_runs_in_its_own_context_and_merges_back(engine: Engine) -> None:
    inner = pb.Workflow(
        name="inner",
        inputs=[pb.WorkflowInput(name="n", type=pb.INPUT_TYPE_INTEGER, required=True)],
        steps=[
            step("x", value="{{inputs.n}}"),
            step("y", depends_on=("x",), value={"double": ["{{steps.x.output}}", "{{steps.x.output}}"]}),
        ],
        outputs={"pair": "{{steps.y.output.double}}"},
    )
    wf = pb.Workflow(
        name="outer",
        steps=[
            pb.WorkflowStep(id="sub", workflow=inner, parameters=to_struct({"n": "{{inputs.n}}"})),
            step("use", depends_on=("sub",), value="{{steps.sub.output.pair}}"),
        ],
        outputs={"result": "{{steps.use.output}}"},
    )
    run, events = await engine.run(wf, n=21)
    assert run.state == pb.RUN_STATE_COMPLETED, run.error
    assert {k: from_value(v) for k, v in run.outputs.items()} == {"result": [21, 21]}
    assert states(run) == {"sub": "COMPLETED", "sub/x": "COMPLETED", "sub/y": "COMPLETED", "use": "COMPLETED"}
    started = [e.step_started.step_id for e in events if e.HasField("step_started")]
    assert started.index("sub") < started.index("sub/x") < started.index("sub/y") < started.index("use")

    bad, _ = await engine.run(pb.Workflow(name="outer", steps=[pb.WorkflowStep(id="sub", workflow=inner)]))
    assert bad.error.reason == "INVALID_INPUTS"


async def test_nesting_deeper_than_the_limit_is_refused(engine: Engine) -> None:
    deepest = workflow(step("leaf"))
    for level in range(3):
        deepest = pb.Workflow(name=f"level{level}", steps=[pb.WorkflowStep(id="down", workflow=deepest)])
    with pytest.raises(InvalidArgumentError) as caught:
        await engine.manager.start_run(
            workflow=deepest,
            inputs=to_struct({}),
            limits=common_pb2.ResourceLimits(max_depth=2),
            context=common_pb2.RequestContext(),
        )
    assert [v.field for v in caught.value.violations] == ["workflow.steps[0].workflow.steps[0].workflow"]


async def test_variables_resolve_once_and_in_batches(engine: Engine) -> None:
    wf = pb.Workflow(
        name="vars",
        inputs=[pb.WorkflowInput(name="name", type=pb.INPUT_TYPE_STRING, default_value=to_value("Ada"))],
        variables={"greeting": "Hello {{inputs.name}}"},
        steps=[step("a", value="{{vars.greeting}}"), step("b", depends_on=("a",), value="{{vars.greeting}}!")],
    )
    run, events = await engine.run(wf)
    assert {k: from_value(v) for k, v in run.outputs.items()} == {"a": "Hello Ada", "b": "Hello Ada!"}
    assert [(e.variable_set.name, from_value(e.variable_set.value)) for e in events if e.HasField("variable_set")] == [
        ("greeting", "Hello Ada")
    ]
    values = await engine.manager.resolve(run.run_id, ["inputs.name", "{{ vars.greeting }}", "steps.b.output"])
    assert values == ["Ada", "Hello Ada", "Hello Ada!"]
    with pytest.raises(InvalidArgumentError) as caught:
        await engine.manager.resolve(run.run_id, ["inputs.name", "steps.nope.output"])
    assert caught.value.violations[0].field == "expressions[1]"


async def test_inputs_are_checked_against_their_declarations(engine: Engine) -> None:
    wf = pb.Workflow(
        name="typed",
        inputs=[
            pb.WorkflowInput(name="city", type=pb.INPUT_TYPE_STRING, required=True),
            pb.WorkflowInput(name="days", type=pb.INPUT_TYPE_INTEGER, default_value=to_value(3)),
        ],
        steps=[step("a", value="{{inputs.days}}")],
    )
    with pytest.raises(InvalidArgumentError) as caught:
        await engine.start(wf, days="three", extra=1)
    assert {(v.field, v.description) for v in caught.value.violations} == {
        ("inputs.city", "is required"),
        ("inputs.days", "must be a whole number, got 'three'"),
        ("inputs.extra", "is not an input of the workflow"),
    }
    run, _ = await engine.run(wf, city="Porto")
    assert from_value(run.outputs["a"]) == 3
    assert from_value(run.inputs.fields["days"]) == 3


async def test_pause_and_resume_do_not_repeat_completed_steps(engine: Engine) -> None:
    wf = workflow(step("first", "test.track", id="first"), step("held", "test.hold", depends_on=("first",), id="held"))
    run = await engine.start(wf)
    await wait_for(lambda: ("start", "held") in engine.tools.log)
    paused = await engine.manager.pause_run(run.run_id, "maintenance")
    assert paused.state == pb.RUN_STATE_PAUSED
    assert states(paused) == {"first": "COMPLETED", "held": "PENDING"}
    engine.tools.gate.set()
    resumed = await engine.manager.resume_run(run.run_id)
    assert resumed.state == pb.RUN_STATE_RUNNING
    events = [event async for event in engine.manager.watch(run.run_id)]
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[-1] == "run_completed"
    assert "run_paused" in kinds and "run_resumed" in kinds
    assert Counter(sid for kind, sid in engine.tools.log if kind == "start") == {"first": 1, "held": 2}
    finished = await engine.manager.get_run(run.run_id)
    assert [s.attempt for s in finished.steps] == [1, 2]


async def test_a_paused_run_can_be_cancelled(engine: Engine) -> None:
    run = await engine.start(workflow(step("held", "test.hold", id="held")))
    await wait_for(lambda: ("start", "held") in engine.tools.log)
    await engine.manager.pause_run(run.run_id, "later")
    cancelled = await engine.manager.cancel_run(run.run_id, "not needed")
    assert cancelled.state == pb.RUN_STATE_CANCELLED
    history = [event async for event in engine.manager.watch(run.run_id)]
    assert [e.WhichOneof("payload") for e in history][-2:] == ["run_paused", "run_cancelled"]
    with pytest.raises(FailedPreconditionError):
        await engine.manager.cancel_run(run.run_id, "again")


async def test_a_run_holds_a_bounded_amount_of_step_outputs() -> None:
    manager = RunManager(MemoryRunStore(), Executor(registry(Tools())), max_held_bytes=2000)
    await manager.open()
    try:
        steps = [
            step(f"s{index}", depends_on=(f"s{index - 1}",) if index else (), value="x" * 500) for index in range(8)
        ]
        run, _ = await manager.start_run(
            workflow=workflow(*steps),
            inputs=pb.StartRunRequest().inputs,
            limits=common_pb2.ResourceLimits(),
            context=common_pb2.RequestContext(),
        )
        events = [event async for event in manager.watch(run.run_id)]
    finally:
        await manager.close()
    assert events[-1].run_failed.error.reason == "OUTPUT_TOO_LARGE"
    assert sum(event.HasField("step_completed") for event in events) == 3  # about 500 bytes each, 2,000 in all


class _GatedStore(MemoryRunStore):
    """A store that holds every write of a step's completion until the test opens its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def write(self, runs: Any, events: Any, fences: Any) -> None:
        if any(event.HasField("step_completed") for event in events):
            await self.gate.wait()
        await super().write(runs, events, fences)


# Two steps, b after a.
_A_THEN_B = workflow(step("a", "test.track", id="a"), step("b", "test.track", depends_on=("a",), id="b"))


@pytest.mark.parametrize("durability", [pb.RUN_DURABILITY_ASYNC, pb.RUN_DURABILITY_SYNC])
async def test_a_run_of_sync_durability_stores_a_step_before_its_dependents_start(
    durability: pb.RunDurability.ValueType,
) -> None:
    store = _GatedStore()
    built = Engine(Tools(), store)
    tools = built.tools
    await built.manager.open()
    try:
        run = await built.start(_A_THEN_B, durability=durability)
        assert run.durability == durability
        await wait_for(lambda: ("finish", "a") in tools.log)
        if durability == pb.RUN_DURABILITY_ASYNC:
            await wait_for(lambda: ("start", "b") in tools.log)  # while a's completion is not stored yet
        else:
            for _ in range(100):  # turns of the event loop: b would start within a few
                await asyncio.sleep(0)
            assert ("start", "b") not in tools.log
        store.gate.set()
        await wait_for(lambda: ("finish", "b") in tools.log)
        events = [e async for e in built.manager.watch(run.run_id)]
        assert events[-1].HasField("run_completed")
    finally:
        store.gate.set()
        await built.manager.close()


async def test_a_step_that_completed_while_its_run_paused_is_not_run_again() -> None:
    """A run of sync durability paused while its step's completion waits to be stored: the step stays
    completed, and the resumed run goes on from it."""
    store = _GatedStore()
    built = Engine(Tools(), store)
    tools, manager = built.tools, built.manager
    await manager.open()
    try:
        run = await built.start(_A_THEN_B, durability=pb.RUN_DURABILITY_SYNC)
        await wait_for(lambda: ("finish", "a") in tools.log)
        pausing = asyncio.create_task(manager.pause_run(run.run_id, "a look"))
        for _ in range(20):
            await asyncio.sleep(0)
        store.gate.set()
        assert (await pausing).state == pb.RUN_STATE_PAUSED
        await manager.resume_run(run.run_id)
        events = [e async for e in manager.watch(run.run_id)]
        assert events[-1].HasField("run_completed"), events[-1]
        assert tools.log.count(("start", "a")) == 1
    finally:
        store.gate.set()
        await manager.close()
