"""CoordinatorService through the SDK: a goal through all three real servers."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.helpers import HttpServer, Stack, open_stack, reply
from tierstack.client import InvalidArgumentError
from tierstack.core.values import from_value, to_duration
from tierstack.server import Settings
from tierstack.server.coordinate.service import CoordinateService
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb

AGENTS = [
    pb.Agent(id="researcher", capabilities=["http", "general"], max_concurrent_tasks=2),
    pb.Agent(id="analyst", capabilities=["analysis"], max_concurrent_tasks=2),
    pb.Agent(id="writer", capabilities=["writing"], max_concurrent_tasks=2),
]


async def test_a_goal_streams_events_from_all_three_tiers_in_order(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/sales.json"] = reply(json.dumps({"total": 1234}).encode())
    request = pb.CoordinateRequest(
        context=common_pb2.RequestContext(correlation_id="goal-trace-1"),
        goal=f"fetch {http_server.url}/sales.json and analyze last year, then write a report",
        agents=AGENTS,
    )
    events = [event async for event in stack.coordinator.coordinate(request)]
    kinds = [event.WhichOneof("payload") for event in events]
    assert kinds[:2] == ["goal_decomposed", "team_formed"]
    assert kinds[-1] == "goal_completed"
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    # One correlation id in every event of every tier.
    run_events = [event.subtask_progress.run_event for event in events if event.HasField("subtask_progress")]
    step_events = [e.step_execution.event for e in run_events if e.HasField("step_execution")]
    assert {"goal-trace-1"} == {e.correlation_id for e in events} | {e.correlation_id for e in run_events} | {
        e.correlation_id for e in step_events
    }
    assert step_events, "Tier 3 events reach the caller"
    assignments = {a.subtask_id: a.agent_id for a in events[1].team_formed.assignments}
    assert assignments == {"s1": "researcher", "s2": "analyst", "s3": "writer"}
    started = [e.subtask_started for e in events if e.HasField("subtask_started")]
    assert {(s.subtask_id, s.agent_id) for s in started} == set(assignments.items())
    finished = {e.subtask_finished.subtask_id: e.subtask_finished for e in events if e.HasField("subtask_finished")}
    assert all(f.success for f in finished.values())
    order = {e.subtask_finished.subtask_id: i for i, e in enumerate(events) if e.HasField("subtask_finished")}
    start_of = {e.subtask_started.subtask_id: i for i, e in enumerate(events) if e.HasField("subtask_started")}
    assert start_of["s3"] > max(order["s1"], order["s2"])
    completed = events[-1].goal_completed
    fetched = from_value(completed.outputs["s1"])
    assert isinstance(fetched, dict) and fetched["json"] == {"total": 1234}
    report = from_value(completed.outputs["s3"])
    assert isinstance(report, str) and report.startswith("write a report") and "1234" in report
    assert set(completed.phase_durations) == {"decomposition", "team_formation", "execution"}
    assert completed.usage.tool_calls == 3


async def test_a_goal_without_capable_agents_fails_before_running(stack: Stack) -> None:
    request = pb.CoordinateRequest(goal="write a poem", agents=[pb.Agent(id="fetcher", capabilities=["http"])])
    events = [event async for event in stack.coordinator.coordinate(request)]
    assert [e.WhichOneof("payload") for e in events] == ["goal_decomposed", "team_formed", "goal_failed"]
    error = events[-1].goal_failed.error
    assert error.reason == "NO_CAPABLE_AGENT"
    assert error.message == "subtask 's1' needs 'writing', which no agent has"
    assert (error.metadata["subtask"], error.metadata["capability"]) == ("s1", "writing")
    assert list(events[1].team_formed.unassigned_subtask_ids) == ["s1"]
    assert list((await stack.orchestrator.list_runs()).runs) == []


async def test_a_failing_subtask_is_replanned_then_fails_the_goal(stack: Stack) -> None:
    scout = pb.Agent(id="scout", capabilities=["http"])
    request = pb.CoordinateRequest(goal="fetch http://example.invalid/x then write it up", agents=[*AGENTS, scout])
    events = [event async for event in stack.coordinator.coordinate(request)]
    finished = [e.subtask_finished for e in events if e.HasField("subtask_finished")]
    assert [(f.subtask_id, f.success, f.error.reason) for f in finished] == [("s1", False, "HOST_NOT_FOUND")] * 3
    replanned = [e.subtask_replanned for e in events if e.HasField("subtask_replanned")]
    first_agent = next(e.subtask_started.agent_id for e in events if e.HasField("subtask_started"))
    assert [(r.replan, r.previous_agent_id) for r in replanned] == [(1, first_agent), (2, replanned[0].agent_id)]
    assert {first_agent, replanned[0].agent_id} == {"researcher", "scout"}  # another capable agent tries
    assert events[-1].goal_failed.error.reason == "HOST_NOT_FOUND"
    assert events[-1].goal_failed.error.metadata["subtask"] == "s1"
    runs = {e.subtask_started.run_id for e in events if e.HasField("subtask_started")}
    assert len(runs) == 3  # each attempt is a Tier 2 run of its own

    no_replans = pb.CoordinateRequest(goal=request.goal, agents=AGENTS, max_replans=0)
    events = [event async for event in stack.coordinator.coordinate(no_replans)]
    assert [e.WhichOneof("payload") for e in events if not e.HasField("subtask_progress")][-2:] == [
        "subtask_finished",
        "goal_failed",
    ]


async def test_a_replanned_subtask_can_succeed(stack: Stack, http_server: HttpServer) -> None:
    hits = 0

    def flaky(request: BaseHTTPRequestHandler) -> None:
        nonlocal hits
        hits += 1
        if hits == 1:
            request.wfile.write(b"not http at all\r\n\r\n")  # the first answer is broken
        else:
            reply(b'{"ok": true}')(request)

    http_server.routes["/flaky"] = flaky
    request = pb.CoordinateRequest(goal=f"fetch {http_server.url}/flaky then write it up", agents=AGENTS)
    events = [event async for event in stack.coordinator.coordinate(request)]
    assert [e.subtask_replanned.error.reason for e in events if e.HasField("subtask_replanned")] == ["HTTP_ERROR"]
    assert events[-1].HasField("goal_completed")
    fetched = from_value(events[-1].goal_completed.outputs["s1"])
    assert isinstance(fetched, dict) and fetched["json"] == {"ok": True}


async def test_the_goal_budget_is_shared_by_complexity_and_enforced(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/a"] = reply(b"{}")
    goal = f"fetch {http_server.url}/a then analyze the numbers and compare them with last year, then write a memo"
    limits = common_pb2.ResourceLimits(max_tool_calls=40, max_credits=8.0)
    events = [
        e async for e in stack.coordinator.coordinate(pb.CoordinateRequest(goal=goal, agents=AGENTS, limits=limits))
    ]
    assert events[-1].HasField("goal_completed")
    complexity = {s.id: s.complexity for s in events[0].goal_decomposed.subtasks}
    shares = {e.subtask_started.subtask_id: e.subtask_started.limits for e in events if e.HasField("subtask_started")}
    assert shares["s1"].max_tool_calls == 40 * complexity["s1"] // sum(complexity.values())
    assert shares["s1"].max_credits == pytest.approx(8.0 * complexity["s1"] / sum(complexity.values()))
    assert all(0 < share.max_tool_calls <= 40 for share in shares.values())
    # What a subtask did not use goes back to the goal: the last subtask gets all that is left.
    last = max(complexity, key=lambda s: int(s[1:]))
    assert shares[last].max_tool_calls == 40 - (len(complexity) - 1)

    tiny = common_pb2.ResourceLimits(max_tool_calls=2)
    events = [
        e async for e in stack.coordinator.coordinate(pb.CoordinateRequest(goal=goal, agents=AGENTS, limits=tiny))
    ]
    assert events[-1].goal_failed.error.reason == "BUDGET_EXHAUSTED"
    assert "tool calls spent: 2 of 2" in events[-1].goal_failed.error.message


async def test_bad_goal_requests_name_the_fields(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.coordinator.decompose_goal(
            pb.DecomposeGoalRequest(goal="  ", agents=[pb.Agent(id="a"), pb.Agent(id="a")])
        )
    assert {v.field for v in caught.value.violations} == {"goal", "agents[1].id"}
    with pytest.raises(InvalidArgumentError) as caught:
        _ = [e async for e in stack.coordinator.coordinate(pb.CoordinateRequest(goal="write a poem"))]
    assert [v.field for v in caught.value.violations] == ["agents"]


async def test_decompose_and_form_team_without_running(stack: Stack) -> None:
    decomposed = await stack.coordinator.decompose_goal(
        pb.DecomposeGoalRequest(goal="analyze churn then write a summary", agents=AGENTS)
    )
    assert decomposed.source == pb.DECOMPOSITION_SOURCE_MODEL and decomposed.producer == "local"
    assert [(s.id, list(s.dependencies)) for s in decomposed.subtasks] == [("s1", []), ("s2", ["s1"])]
    team = await stack.coordinator.form_team(pb.FormTeamRequest(agents=AGENTS, subtasks=decomposed.subtasks))
    assert [(a.subtask_id, a.agent_id) for a in team.assignments] == [("s1", "analyst"), ("s2", "writer")]
    assert list(team.unassigned_subtask_ids) == []


async def test_an_agent_takes_a_whole_chain_of_stages_one_after_another(stack: Stack) -> None:
    """The goal of the issue: five stages, each an analysis, for one analyst of capacity 4."""
    goal = (
        "analyze the revenue, then analyze the costs, then analyze the margins, then analyze the churn, "
        "then analyze the forecast"
    )
    analyst = [pb.Agent(id="analyst", capabilities=["analysis"], max_concurrent_tasks=4)]
    events = [e async for e in stack.coordinator.coordinate(pb.CoordinateRequest(goal=goal, agents=analyst))]
    assert events[-1].HasField("goal_completed"), events[-1]
    assert {a.agent_id for a in events[1].team_formed.assignments} == {"analyst"}
    assert len(events[1].team_formed.assignments) == 5


async def test_form_team_counts_what_runs_at_once_and_refuses_a_cycle(stack: Stack) -> None:
    analyst = [pb.Agent(id="analyst", capabilities=["analysis"], max_concurrent_tasks=2)]
    side_by_side = [pb.Subtask(id=f"s{i}", required_capabilities=["analysis"]) for i in range(3)]
    team = await stack.coordinator.form_team(pb.FormTeamRequest(agents=analyst, subtasks=side_by_side))
    assert len(team.unassigned_subtask_ids) == 1  # three could run at once
    team = await stack.coordinator.form_team(
        pb.FormTeamRequest(agents=analyst, subtasks=side_by_side, max_parallelism=2)
    )
    assert not team.unassigned_subtask_ids  # the goal runs two at a time
    cycle = [pb.Subtask(id="a", dependencies=["b"]), pb.Subtask(id="b", dependencies=["a"])]
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.coordinator.form_team(pb.FormTeamRequest(agents=analyst, subtasks=cycle))
    assert [v.field for v in caught.value.violations] == ["subtasks"]


async def test_a_goal_out_of_time_fails_and_its_runs_are_cancelled(stack: Stack, http_server: HttpServer) -> None:
    release = threading.Event()

    def hold(request: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        reply(b"{}")(request)

    http_server.routes["/hold"] = hold
    limits = common_pb2.ResourceLimits(max_duration=to_duration(0.5))
    request = pb.CoordinateRequest(goal=f"fetch {http_server.url}/hold then write it up", agents=AGENTS, limits=limits)
    try:
        events = [e async for e in stack.coordinator.coordinate(request)]
    finally:
        release.set()
    assert events[-1].goal_failed.error.reason == "DEADLINE_EXCEEDED"
    [run_id] = [e.subtask_started.run_id for e in events if e.HasField("subtask_started")]

    async def cancelled() -> bool:
        return (await stack.orchestrator.get_run(run_id)).state == orchestrator_pb.RUN_STATE_CANCELLED

    for _ in range(200):
        if await cancelled():
            break
        await asyncio.sleep(0.02)
    assert await cancelled()


async def test_ready_subtasks_start_by_priority(data_dir: Path, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    subtasks = [
        f"  - {{id: {name}, description: {name}, priority: {priority}, required_capabilities: [writing],"
        f" tool: text.template, parameters: {{template: {name}}}}}"
        for name, priority in (("later", "PRIORITY_LOW"), ("first", "PRIORITY_HIGH"), ("then", "PRIORITY_MEDIUM"))
    ]
    (templates / "three.yaml").write_text("name: three\npattern: '^three things$'\nsubtasks:\n" + "\n".join(subtasks))
    async with open_stack(Settings(data_dir=data_dir, templates_dir=templates)) as stack:
        limits = common_pb2.ResourceLimits(max_parallelism=1)
        writer = pb.Agent(id="w", capabilities=["writing"], max_concurrent_tasks=3)
        request = pb.CoordinateRequest(goal="three things", agents=[writer], limits=limits)
        events = [e async for e in stack.coordinator.coordinate(request)]
    assert events[-1].HasField("goal_completed")
    started = [e.subtask_started.subtask_id for e in events if e.HasField("subtask_started")]
    assert started == ["first", "then", "later"]


async def test_an_unexpected_error_before_any_run_ends_the_goal_with_internal(stack: Stack) -> None:
    service = stack.coordinate.service
    assert isinstance(service, CoordinateService)

    async def broken(*arguments: object) -> pb.DecomposeGoalResponse:
        raise KeyError("no such thing")

    service.coordinator.decomposer.decompose = broken  # type: ignore[method-assign,assignment]
    events = [e async for e in stack.coordinator.coordinate(pb.CoordinateRequest(goal="write a report", agents=AGENTS))]
    assert [e.WhichOneof("payload") for e in events] == ["goal_failed"]
    assert events[0].goal_failed.error.reason == "INTERNAL"


async def test_the_largest_capacity_allowed_forms_a_team(stack: Stack) -> None:
    subtasks = [pb.Subtask(id=f"s{i}", required_capabilities=["writing"]) for i in range(3)]

    async def form(agent: pb.Agent) -> tuple[list[str], list[str]]:
        team = await stack.coordinator.form_team(pb.FormTeamRequest(agents=[agent], subtasks=subtasks))
        return [a.subtask_id for a in team.assignments], list(team.unassigned_subtask_ids)

    big = pb.Agent(id="big", capabilities=["writing"], max_concurrent_tasks=1_000_000)  # the bound's maximum
    assert await form(big) == (["s0", "s1", "s2"], [])
