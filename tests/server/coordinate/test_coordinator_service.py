"""CoordinatorService through the SDK: a goal through all three real servers."""

from __future__ import annotations

import json

import pytest

from tests.helpers import HttpServer, Stack, reply
from tierstack.client import InvalidArgumentError
from tierstack.client.values import from_value
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb

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
    assert events[-1].goal_failed.error.reason == "NO_CAPABLE_AGENT"
    assert list(events[1].team_formed.unassigned_subtask_ids) == ["s1"]
    assert list((await stack.orchestrator.list_runs()).runs) == []


async def test_a_failing_subtask_fails_the_goal(stack: Stack) -> None:
    request = pb.CoordinateRequest(goal="fetch http://example.invalid/x then write it up", agents=AGENTS)
    events = [event async for event in stack.coordinator.coordinate(request)]
    finished = [e.subtask_finished for e in events if e.HasField("subtask_finished")]
    assert [(f.subtask_id, f.success, f.error.reason) for f in finished] == [("s1", False, "HOST_NOT_ALLOWED")]
    assert events[-1].goal_failed.error.reason == "HOST_NOT_ALLOWED"


async def test_bad_goal_requests_name_the_fields(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.coordinator.decompose_goal(
            pb.DecomposeGoalRequest(goal="  ", agents=[pb.Agent(id="a"), pb.Agent(id="a")])
        )
    assert {v.field for v in caught.value.field_violations} == {"goal", "agents[1].id"}
    with pytest.raises(InvalidArgumentError) as caught:
        _ = [e async for e in stack.coordinator.coordinate(pb.CoordinateRequest(goal="write a poem"))]
    assert [v.field for v in caught.value.field_violations] == ["agents"]


async def test_decompose_and_form_team_without_running(stack: Stack) -> None:
    decomposed = await stack.coordinator.decompose_goal(
        pb.DecomposeGoalRequest(goal="analyze churn then write a summary", agents=AGENTS)
    )
    assert decomposed.source == pb.DECOMPOSITION_SOURCE_MODEL and decomposed.producer == "local"
    assert [(s.id, list(s.dependencies)) for s in decomposed.subtasks] == [("s1", []), ("s2", ["s1"])]
    team = await stack.coordinator.form_team(pb.FormTeamRequest(agents=AGENTS, subtasks=decomposed.subtasks))
    assert [(a.subtask_id, a.agent_id) for a in team.assignments] == [("s1", "analyst"), ("s2", "writer")]
    assert list(team.unassigned_subtask_ids) == []
