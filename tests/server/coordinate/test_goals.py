"""Goals as durable resources, through the real servers and the SDK: started detached, read,
watched from any sequence, listed, cancelled, idempotent by request id, and outliving their callers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import HttpServer, Stack, open_stack, reply, start_tier, wait_for
from tierstack.client import CoordinatorClient, FailedPreconditionError, NotFoundError, OrchestratorClient
from tierstack.core.values import from_value
from tierstack.server import Settings
from tierstack.server.coordinate import Coordinator, Decomposer, GoalMemory, LocalProvider
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

AGENTS = [
    pb.Agent(id="researcher", capabilities=["http", "general"], max_concurrent_tasks=2),
    pb.Agent(id="writer", capabilities=["writing"], max_concurrent_tasks=2),
]


def goal_of(http_server: HttpServer, path: str = "/hold") -> str:
    return f"fetch {http_server.url}{path} then write it up"


async def first(events: AsyncIterator[pb.GoalEvent], kind: str) -> pb.GoalEvent:
    async for event in events:
        if event.WhichOneof("payload") == kind:
            return event
    raise AssertionError(f"the goal ended without {kind}")


async def test_a_detached_goal_completes_and_every_watch_shows_one_gap_free_history(
    stack: Stack, http_server: HttpServer, held: threading.Event
) -> None:
    request = pb.StartGoalRequest(goal=goal_of(http_server), agents=AGENTS)
    started = await stack.coordinator.start_goal(request)
    goal_id = started.goal.goal_id
    assert started.created and started.goal.request.goal == request.goal
    from_start: list[pb.GoalEvent] = []
    from_middle: list[pb.GoalEvent] = []

    async def collect(into: list[pb.GoalEvent], after: int) -> None:
        async for event in stack.coordinator.watch_goal(goal_id, after_sequence=after):
            into.append(event)

    whole = asyncio.create_task(collect(from_start, 0))
    await wait_for(lambda: any(e.HasField("subtask_started") for e in from_start))
    middle = from_start[1].sequence  # a live watch that starts in the middle of the history
    part = asyncio.create_task(collect(from_middle, middle))
    held.set()
    await asyncio.gather(whole, part)

    assert from_start[-1].HasField("goal_completed")
    assert [e.sequence for e in from_start] == list(range(1, len(from_start) + 1))
    assert from_middle == from_start[middle:]
    goal = await stack.coordinator.get_goal(goal_id)
    assert goal.state == pb.GOAL_STATE_COMPLETED
    assert goal.last_sequence == len(from_start)
    fetched = from_value(goal.outputs["s1"])
    assert isinstance(fetched, dict) and fetched["json"] == {"held": True}
    assert goal.end_time.ToNanoseconds() >= goal.create_time.ToNanoseconds() > 0
    replay = [e async for e in stack.coordinator.watch_goal(goal_id)]  # after the end: from the store
    assert replay == from_start
    assert [e async for e in stack.coordinator.watch_goal(goal_id, after_sequence=middle)] == from_start[middle:]


async def test_a_coordinate_caller_that_leaves_does_not_cancel_its_goal(
    stack: Stack, http_server: HttpServer, held: threading.Event
) -> None:
    request = pb.CoordinateRequest(goal=goal_of(http_server), agents=AGENTS)
    events = stack.coordinator.coordinate(request)
    started = await first(events, "subtask_started")
    await events.aclose()  # type: ignore[attr-defined]  # the caller leaves
    goal_id = started.goal_id
    held.set()
    history = [e async for e in stack.coordinator.watch_goal(goal_id)]
    assert history[-1].HasField("goal_completed")
    assert (await stack.coordinator.get_goal(goal_id)).state == pb.GOAL_STATE_COMPLETED


async def test_a_coordinate_caller_that_asks_cancels_its_goal_by_leaving(
    stack: Stack, http_server: HttpServer, held: threading.Event
) -> None:
    request = pb.CoordinateRequest(goal=goal_of(http_server), agents=AGENTS, cancel_on_disconnect=True)
    events = stack.coordinator.coordinate(request)
    started = await first(events, "subtask_started")
    await events.aclose()  # type: ignore[attr-defined]
    history = [e async for e in stack.coordinator.watch_goal(started.goal_id)]
    assert history[-1].goal_cancelled.reason == "the caller of Coordinate went away"
    run = await stack.orchestrator.get_run(started.subtask_started.run_id)
    assert run.state == orchestrator_pb.RUN_STATE_CANCELLED


async def test_cancel_goal_cancels_the_goal_and_its_runs(
    stack: Stack, http_server: HttpServer, held: threading.Event
) -> None:
    goal_id = (
        await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal_of(http_server), agents=AGENTS))
    ).goal.goal_id
    started = await first(stack.coordinator.watch_goal(goal_id), "subtask_started")
    cancelled = await stack.coordinator.cancel_goal(goal_id, reason="changed my mind")
    assert cancelled.state == pb.GOAL_STATE_CANCELLED
    run = await stack.orchestrator.get_run(started.subtask_started.run_id)
    assert run.state == orchestrator_pb.RUN_STATE_CANCELLED
    history = [e async for e in stack.coordinator.watch_goal(goal_id)]
    assert history[-1].goal_cancelled.reason == "changed my mind"
    assert not any(e.HasField("subtask_finished") and e.subtask_finished.success for e in history)
    with pytest.raises(FailedPreconditionError) as caught:
        await stack.coordinator.cancel_goal(goal_id)
    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert "CANCELLED" in caught.value.message
    with pytest.raises(NotFoundError):
        await stack.coordinator.cancel_goal("no-such-goal")


async def test_list_goals_pages_newest_first_and_filters_by_state(
    stack: Stack, http_server: HttpServer, held: threading.Event
) -> None:
    http_server.routes["/quick"] = reply(b"{}")
    done = []
    for _ in range(3):
        started = await stack.coordinator.start_goal(
            pb.StartGoalRequest(goal=goal_of(http_server, "/quick"), agents=AGENTS)
        )
        _ = [e async for e in stack.coordinator.watch_goal(started.goal.goal_id)]
        done.append(started.goal.goal_id)
    waiting = (await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal_of(http_server), agents=AGENTS))).goal
    first_page = await stack.coordinator.list_goals(pb.ListGoalsRequest(page_size=3))
    assert [g.goal_id for g in first_page.goals] == [waiting.goal_id, done[2], done[1]]
    assert first_page.goals[0].state == pb.GOAL_STATE_RUNNING
    second = await stack.coordinator.list_goals(pb.ListGoalsRequest(page_size=3, page_token=first_page.next_page_token))
    assert [g.goal_id for g in second.goals] == [done[0]] and not second.next_page_token
    completed = await stack.coordinator.list_goals(pb.ListGoalsRequest(state=pb.GOAL_STATE_COMPLETED))
    assert [g.goal_id for g in completed.goals] == done[::-1]
    await stack.coordinator.cancel_goal(waiting.goal_id)
    cancelled = await stack.coordinator.list_goals(pb.ListGoalsRequest(state=pb.GOAL_STATE_CANCELLED))
    assert [g.goal_id for g in cancelled.goals] == [waiting.goal_id]


async def test_one_request_id_starts_one_goal(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/once"] = reply(b"{}")
    request = pb.StartGoalRequest(request_id="report-2026-12", goal=goal_of(http_server, "/once"), agents=AGENTS)
    first_call, second_call = await asyncio.gather(
        stack.coordinator.start_goal(request), stack.coordinator.start_goal(request)
    )
    assert first_call.goal.goal_id == second_call.goal.goal_id
    assert sorted([first_call.created, second_call.created]) == [False, True]
    same = pb.CoordinateRequest(request_id="report-2026-12", goal=request.goal, agents=AGENTS)
    events = [e async for e in stack.coordinator.coordinate(same)]
    assert {e.goal_id for e in events} == {first_call.goal.goal_id}
    assert events[-1].HasField("goal_completed")
    assert len((await stack.coordinator.list_goals()).goals) == 1
    assert http_server.hits.count("/once") == 1


async def test_a_coordinator_that_lost_its_goal_to_another_is_refused(
    data_dir: Path, http_server: HttpServer, held: threading.Event
) -> None:
    settings = Settings(data_dir=data_dir)
    async with open_stack(settings) as stack:
        goal_id = (
            await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal_of(http_server), agents=AGENTS))
        ).goal.goal_id
        old_watch = stack.coordinator.watch_goal(goal_id)
        started = await first(old_watch, "subtask_started")
        # A second server on the same data takes up the unfinished goal: it is the owner now.
        second = await start_tier(
            "coordinate",
            dataclasses.replace(
                settings, orchestrate_target=stack.orchestrate.target, execute_target=stack.execute.target
            ),
        )
        try:
            async with CoordinatorClient(second.target) as client:
                held.set()
                history = [e async for e in client.watch_goal(goal_id)]
                goal = await client.get_goal(goal_id)
        finally:
            await second.stop()
        with pytest.raises(FailedPreconditionError) as caught:
            async for _ in old_watch:  # the first server's next write was refused
                pass
        assert caught.value.reason == "STALE_OWNER"
        assert (await stack.coordinator.get_goal(goal_id)).state == pb.GOAL_STATE_COMPLETED  # as stored
    assert goal.state == pb.GOAL_STATE_COMPLETED
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert [e.WhichOneof("payload") for e in history].count("goal_completed") == 1
    assert sum(e.HasField("goal_resumed") for e in history) == 1
    [run_id] = {
        e.subtask_started.run_id
        for e in history
        if e.HasField("subtask_started") and e.subtask_started.subtask_id == "s1"
    }
    assert run_id == started.subtask_started.run_id, "the new owner watched the same run"
    assert http_server.hits.count("/hold") == 1


class BreakingRunner:
    """Tier 2 through the real client, except that watching a run breaks after its first event, as
    an unexpected bug in the coordinator would."""

    def __init__(self, client: OrchestratorClient) -> None:
        self._client = client
        self.start_run = client.start_run
        self.get_run = client.get_run
        self.cancel_run = client.cancel_run

    async def watch_run(self, run_id: str, *, after_sequence: int = 0) -> AsyncIterator[orchestrator_pb.RunEvent]:
        async for event in self._client.watch_run(run_id, after_sequence=after_sequence):
            yield event
            raise RuntimeError("a bug at /internal/path")


async def test_an_unexpected_failure_ends_the_goal_as_internal_and_cancels_its_runs(
    stack: Stack, http_server: HttpServer, held: threading.Event
) -> None:
    decomposer = Decomposer(memory=GoalMemory(), provider=LocalProvider())
    coordinator = Coordinator(BreakingRunner(stack.orchestrator), decomposer)
    try:
        request = pb.CoordinateRequest(goal=goal_of(http_server), agents=AGENTS)
        events = [event async for event in coordinator.coordinate(request)]
    finally:
        await coordinator.close()
    failed = events[-1].goal_failed.error
    assert (
        failed.reason == "INTERNAL" and "/internal/path" not in failed.message and "RuntimeError" not in failed.message
    )
    [run_id] = [e.subtask_started.run_id for e in events if e.HasField("subtask_started")]
    assert (await stack.orchestrator.get_run(run_id)).state == orchestrator_pb.RUN_STATE_CANCELLED
    assert (await coordinator.get_goal(events[-1].goal_id)).state == pb.GOAL_STATE_FAILED


async def finished(stack: Stack, goal: str, agents: list[pb.Agent]) -> list[pb.GoalEvent]:
    started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal, agents=agents))
    return [event async for event in stack.coordinator.watch_goal(started.goal.goal_id)]


async def test_what_a_goal_says_is_data_never_a_template(stack: Stack) -> None:
    """Template braces in a goal reach the tools as written, in every subtask."""
    goal = "what does {{inputs.city}} mean, then write up {{ steps.s1.output }} and {{inputs.s3}}"
    events = await finished(
        stack, goal, [pb.Agent(id="a", capabilities=["general", "writing"], max_concurrent_tasks=4)]
    )
    assert events[-1].HasField("goal_completed"), events[-1]
    outputs = {key: from_value(value) for key, value in events[-1].goal_completed.outputs.items()}
    assert str(outputs["s1"]).startswith("what does {{inputs.city}} mean")
    assert str(outputs["s2"]).startswith("write up {{ steps.s1.output }} and {{inputs.s3}}")
    assert "[s1] what does {{inputs.city}} mean" in str(outputs["s2"])  # its dependency's output, read


async def by_template(
    tmp_path: Path, goal: str, pattern: str, then: str, *, word: str = "soon", agents: int = 1, **request: Any
) -> list[pb.GoalEvent]:
    """Pursues ``goal`` through a stack whose goal template (matching ``pattern``) says ``word`` with
    core.echo, then carries out ``then`` (a YAML subtask that depends on the word)."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "two-steps.yaml").write_text(
        f"name: two-steps\npattern: '{pattern}'\nsubtasks:\n"
        "  - {id: word, description: say a word, required_capabilities: [general], tool: core.echo,"
        f" parameters: {{value: {word}}}}}\n"
        f"  - {{dependencies: [word], required_capabilities: [general], {then}}}\n"
    )
    team = [pb.Agent(id=f"a{n}", capabilities=["general"], max_concurrent_tasks=2) for n in range(agents)]
    async with open_stack(Settings(data_dir=tmp_path, templates_dir=templates)) as stack:
        started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal, agents=team, **request))
        return [event async for event in stack.coordinator.watch_goal(started.goal.goal_id)]


async def test_a_failure_that_would_only_repeat_is_not_replanned(tmp_path: Path) -> None:
    """A subtask whose call its own arguments make fail fails the goal at once: another agent would run
    the same call."""
    nap = "id: nap, description: nap for the word, tool: core.sleep, parameters: {seconds: '{{inputs.word}}'}"
    events = await by_template(tmp_path, "nap badly", "^nap badly$", nap, agents=3)
    kinds = [event.WhichOneof("payload") for event in events]
    assert "subtask_replanned" not in kinds, kinds
    assert events[-1].goal_failed.error.reason == "INVALID_TOOL_ARGUMENTS", events[-1]
    assert events[-1].goal_failed.error.metadata["subtask"] == "nap"


async def test_a_template_reads_a_dependency_inside_longer_text_and_the_goals_words_as_data(tmp_path: Path) -> None:
    greet = "id: greet, description: greet, tool: core.echo, parameters: {value: '{{inputs.word}}, $who!'}"
    goal = "greet {{inputs.city}} and {{vars.x}}"
    events = await by_template(tmp_path, goal, "^greet (?P<who>.+)$", greet, word="hello")
    assert events[-1].HasField("goal_completed"), events[-1]
    assert from_value(events[-1].goal_completed.outputs["greet"]) == "hello, {{inputs.city}} and {{vars.x}}!"


async def test_a_failed_goal_reports_what_its_failed_runs_used(tmp_path: Path) -> None:
    query = "id: query, description: query, tool: json.query, parameters: {data: '{{inputs.word}}', expression: '[?'}"
    events = await by_template(tmp_path, "query badly", "^query badly$", query, max_replans=1)
    assert events[-1].goal_failed.error.reason == "INVALID_EXPRESSION", events[-1]
    assert events[-1].goal_failed.usage.tool_calls == 3  # the word's call, and both attempts at the query
