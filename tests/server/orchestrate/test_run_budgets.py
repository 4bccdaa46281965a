"""A run's budget through the SDK: steps running at once share what the run has left and together
never pass it, a step with no share left waits for one, and the run warns at 80 % and 95 % of each
budget once, across a restart too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

from google.protobuf import duration_pb2

from tests.helpers import Stack, registry_of, start_tier, wait_for
from tests.server.orchestrate.workflows import step, workflow
from tests.server.spender import Spender, warnings
from tierstack.client import OrchestratorClient
from tierstack.core.values import JSON, to_duration
from tierstack.server import Settings, TierServer
from tierstack.server.execute import Tool, ToolContext, ToolError
from tierstack.v1 import common_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb


async def run_to_end(stack: Stack, wf: pb.Workflow, limits: common_pb2.ResourceLimits) -> list[pb.RunEvent]:
    return [e async for e in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf, limits=limits))]


async def test_steps_running_at_once_share_what_the_run_has_left(stack: Stack) -> None:
    spender = Spender(stack.execute)
    spender.together = asyncio.Barrier(4)  # the four are in flight at once
    # Each of the four would use all it is given: with the whole budget each, four times what is left.
    wf = workflow(
        step("first", "test.spend", tokens=100),
        *(step(f"s{n}", "test.spend", depends_on=("first",), together=True) for n in range(4)),
    )
    events = await run_to_end(stack, wf, common_pb2.ResourceLimits(max_tokens=1000))
    assert events[-1].HasField("run_completed"), events[-1]
    assert events[-1].run_completed.usage.tokens <= 1000
    shares = {e.step_started.step_id: e.step_started.limits.max_tokens for e in events if e.HasField("step_started")}
    assert sum(shares[f"s{n}"] for n in range(4)) <= 1000 - 100
    assert Counter(spender.allowed[1:]) == Counter(shares[f"s{n}"] for n in range(4))  # what Tier 3 held them to


async def test_a_step_with_no_share_left_waits_for_one_and_a_spent_budget_fails_the_run(stack: Stack) -> None:
    Spender(stack.execute)
    # Two tokens among three steps at once: the third gets none until one of the others ends (using nothing).
    wf = workflow(*(step(f"s{n}", "test.spend", tokens=0) for n in range(3)))
    events = await run_to_end(stack, wf, common_pb2.ResourceLimits(max_tokens=2))
    assert events[-1].HasField("run_completed"), events[-1]
    kinds = [(e.WhichOneof("payload"), e.step_started.step_id) for e in events]
    first_end = next(i for i, (kind, _) in enumerate(kinds) if kind == "step_completed")
    assert kinds.index(("step_started", "s2")) > first_end
    shares = [e.step_started.limits.max_tokens for e in events if e.HasField("step_started")]
    assert shares[:2] == [1, 1] and shares[2] in (1, 2)  # then what one or both of the others gave back

    # Two tool calls among three steps of one call each: the third waits, then finds the budget spent.
    spent = await run_to_end(
        stack, workflow(*(step(f"s{n}") for n in range(3))), common_pb2.ResourceLimits(max_tool_calls=2)
    )
    assert spent[-1].run_failed.error.reason == "BUDGET_EXHAUSTED", spent[-1]
    assert spent[-1].run_failed.error.message == "the run's tool calls spent: 2 of 2"
    assert spent[-1].run_failed.usage.tool_calls == 2


async def test_a_run_warns_at_80_and_95_percent_of_each_budget_once(stack: Stack) -> None:
    Spender(stack.execute)
    wf = workflow(
        step("a", "test.spend", tokens=50),
        step("b", "test.spend", depends_on=("a",), tokens=35),
        step("c", "test.spend", depends_on=("b",), tokens=12),
        step("d", "test.spend", depends_on=("c",), tokens=2),
    )
    events = await run_to_end(stack, wf, common_pb2.ResourceLimits(max_tokens=100, max_tool_calls=5))
    assert events[-1].HasField("run_completed"), events[-1]
    assert warnings(events) == [("tokens", 80, 85, 100), ("tokens", 95, 97, 100), ("tool_calls", 80, 4, 5)]
    history = [e async for e in stack.orchestrator.watch_run(events[0].run_id)]
    assert warnings(history) == warnings(events)  # stored like every other event


async def test_a_run_warns_at_80_and_95_percent_of_its_time(stack: Stack) -> None:
    wf = workflow(step("nap", "core.sleep", seconds=60))
    events = await run_to_end(
        stack, wf, common_pb2.ResourceLimits(max_duration=duration_pb2.Duration(nanos=300_000_000))
    )
    assert events[-1].run_failed.error.reason == "DEADLINE_EXCEEDED", events[-1]
    assert [(budget, percent, limit) for budget, percent, _, limit in warnings(events)] == [
        ("duration", 80, 0.3),
        ("duration", 95, 0.3),
    ]


async def test_a_resumed_run_keeps_its_warnings_and_its_steps_shares(data_dir: Path, store_url: str) -> None:
    execute = await start_tier("execute", Settings(data_dir=data_dir, store_url=store_url))
    spender = Spender(execute)
    settings = Settings(execute_target=execute.target, data_dir=data_dir, store_url=store_url)
    wf = workflow(step("a", "test.spend", tokens=85), step("b", "test.spend", depends_on=("a",), tokens=11, hold=True))
    limits = common_pb2.ResourceLimits(max_tokens=100)
    try:
        first = await start_tier("orchestrate", settings)
        try:
            async with OrchestratorClient(first.target) as client:
                run_id = (await client.start_run(pb.StartRunRequest(workflow=wf, limits=limits))).run.run_id
                await wait_for(lambda: len(spender.allowed) == 2)  # b is in flight at Tier 3
        finally:
            await first.stop()
        second = await start_tier("orchestrate", settings)
        try:
            async with OrchestratorClient(second.target) as client:
                spender.released.set()
                history = [e async for e in client.watch_run(run_id)]
        finally:
            await second.stop()
    finally:
        spender.released.set()
        await execute.stop()
    assert history[-1].HasField("run_completed"), history[-1]
    kinds = [e.WhichOneof("payload") for e in history]
    assert warnings(history) == [("tokens", 80, 85, 100), ("tokens", 95, 96, 100)]
    assert (
        kinds.index("budget_warning")
        < kinds.index("run_resumed")
        < len(kinds) - 1 - kinds[::-1].index("budget_warning")
    )
    # b ran on at Tier 3 across the restart, and its share stayed taken: it started twice with the same one.
    shares = [e.step_started.limits.max_tokens for e in history if e.step_started.step_id == "b"]
    assert shares == [15, 15]


def _costing(execute: TierServer, **credits: float) -> None:
    """Registers at Tier 3 a tool of each name whose call costs the credits given."""

    async def answer(arguments: dict[str, JSON], context: ToolContext) -> JSON:
        return 1

    for name, cost in credits.items():
        registry_of(execute).register(
            Tool(name=f"test.{name}", description="costs", parameters={"type": "object"}, handler=answer, credits=cost)
        )


async def test_a_run_that_fits_its_budget_completes_whatever_its_steps_cost_at_once(stack: Stack) -> None:
    """Two steps at once cost 6 and 2 of 10 credits: an even split (5 each) would refuse the first; it
    waits for the other's share to come back and asks again."""
    _costing(stack.execute, six=6, two=2)
    events = await run_to_end(
        stack, workflow(step("a", "test.six"), step("b", "test.two")), common_pb2.ResourceLimits(max_credits=10)
    )
    assert events[-1].HasField("run_completed"), events[-1]
    assert events[-1].run_completed.usage.credits == 8


async def test_a_step_whose_condition_is_false_takes_no_share(stack: Stack) -> None:
    _costing(stack.execute, six=6, two=2)
    skipped = step("b", "test.two")
    skipped.when = "`false`"
    events = await run_to_end(
        stack, workflow(step("a", "test.six"), skipped), common_pb2.ResourceLimits(max_credits=10)
    )
    assert events[-1].HasField("run_completed"), events[-1]
    [share] = [e.step_started.limits.max_credits for e in events if e.HasField("step_started")]
    assert share == 10  # all that was left: nothing else would run beside it


async def test_a_restart_while_a_step_waits_to_be_tried_again_tries_the_next_attempt(data_dir: Path) -> None:
    """The attempt that failed was charged once: after the restart the next attempt runs, and the run
    is charged what the tool really used."""
    calls: list[int | None] = []

    async def flaky(arguments: dict[str, JSON], context: ToolContext) -> JSON:
        calls.append(context.tokens_left)
        context.meter.tokens += 30
        if len(calls) == 1:
            raise ToolError("FLAKY", "once")
        return "ok"

    settings = Settings(data_dir=data_dir)
    execute = await start_tier("execute", settings)
    registry_of(execute).register(
        Tool(name="test.flaky", description="fails once", parameters={"type": "object"}, handler=flaky)
    )
    settings = dataclasses.replace(settings, execute_target=execute.target)
    flaky_step = step("a", "test.flaky")
    flaky_step.retry.max_attempts = 3
    flaky_step.retry.initial_backoff.CopyFrom(to_duration(60))  # the restart comes first
    try:
        first = await start_tier("orchestrate", settings)
        try:
            async with OrchestratorClient(first.target) as client:
                started = await client.start_run(
                    pb.StartRunRequest(workflow=workflow(flaky_step), limits=common_pb2.ResourceLimits(max_tokens=100))
                )
                run_id = started.run.run_id
                seen: list[pb.RunEvent] = []

                async def retried() -> None:
                    async for event in client.watch_run(run_id):
                        seen.append(event)
                        if event.HasField("step_retried"):
                            return

                await asyncio.wait_for(retried(), 30)  # stored: the run waits out its backoff
        finally:
            await first.stop()
        second = await start_tier("orchestrate", settings)
        try:
            async with OrchestratorClient(second.target) as client:
                history = [e async for e in client.watch_run(run_id)]
        finally:
            await second.stop()
    finally:
        await execute.stop()
    assert history[-1].HasField("run_completed"), history[-1]
    assert [e.step_retried.attempt for e in history if e.HasField("step_retried")] == [1]
    assert history[-1].run_completed.usage.tokens == 60 == 30 * len(calls)
    assert calls == [100, 70]  # the second attempt was given what the first left
