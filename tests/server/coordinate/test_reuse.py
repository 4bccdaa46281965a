"""Reuse of past goals through the real servers: a past goal that differs in particulars alone has
its subtasks re-bound to the new goal's, one that differs in substance is not reused, only goals
that succeeded are learnt, and a reused decomposition that fails is demoted."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import HttpServer, Stack, echo
from tierstack.core.values import from_struct, from_value
from tierstack.server.ai import Scope
from tierstack.server.coordinate import LocalProvider
from tierstack.server.coordinate.decomposer import subtask_message
from tierstack.v1 import coordinator_service_pb2 as pb

AGENTS = [
    pb.Agent(id="researcher", capabilities=["http", "general"], max_concurrent_tasks=4),
    pb.Agent(id="writer", capabilities=["writing", "analysis"], max_concurrent_tasks=4),
]


async def pursue(stack: Stack, goal: str, **request: Any) -> list[pb.GoalEvent]:
    started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal, agents=AGENTS, **request))
    return [event async for event in stack.coordinator.watch_goal(started.goal.goal_id)]


def decomposed(events: list[pb.GoalEvent]) -> pb.GoalDecomposed:
    return next(event.goal_decomposed for event in events if event.HasField("goal_decomposed"))


async def fresh(goal: str) -> list[pb.Subtask]:
    """Returns the subtasks the built-in rules give ``goal`` itself."""
    return [subtask_message(spec) for spec in await LocalProvider().decompose(goal, AGENTS, Scope())]


async def test_a_past_goal_about_another_customer_is_rebound_to_this_one(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/customers/alice"] = http_server.routes["/customers/bob"] = echo
    alice = f"fetch {http_server.url}/customers/alice, then summarize the customer for Alice in English"
    bob = f"fetch {http_server.url}/customers/bob, then summarize the customer for Bob in French"
    first = await pursue(stack, alice)
    assert first[-1].HasField("goal_completed"), first[-1]
    assert decomposed(first).source == pb.DECOMPOSITION_SOURCE_MODEL
    second = await pursue(stack, bob)
    assert second[-1].HasField("goal_completed"), second[-1]
    reused = decomposed(second)
    assert (reused.source, reused.similar_goal) == (pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL, alice)
    assert dict(reused.rebound_particulars) == {
        f"{http_server.url}/customers/alice": f"{http_server.url}/customers/bob",
        "Alice": "Bob",
        "English": "French",
    }
    assert http_server.hits == ["/customers/alice", "/customers/bob"]  # Bob's goal called for Bob
    summary = str(from_value(second[-1].goal_completed.outputs["s2"]))
    assert summary.startswith("summarize the customer for Bob in French") and "alice" not in summary.lower()


# Pairs of goals that differ in particulars: a name, a number or id, a date, a quoted string, a
# language, a URL; the second reuses the first's subtasks, re-bound as its own would be.
PARTICULARS = [
    ("analyze the Q1 sales figures, then write a report", "analyze the Q2 sales figures, then write a report"),
    ("count the top 10 products and rank them", "count the top 25 products and rank them"),
    ("summarize the memo of March 3, 2024 for Alice", "summarize the memo of 2024-04-05 for Carol"),
    (
        "check the 'draft' folder, then write a report in German",
        "check the 'final' folder, then write a report in Dutch",
    ),
    ("compare Alice and Bob, then write it up", "compare Bob and Alice, then write it up"),
]
# Pairs that differ in substance: the second is decomposed afresh.
SUBSTANCE = [
    ("analyze the Q1 sales figures, then write a report", "analyze the Q1 costs figures, then write a report"),
    ("analyze the sales, then write a report", "analyze the sales, then write a report in French"),
    ("compare Alice and Bob, then write it up", "compare Alice and 7, then write it up"),
    ("count the top 10 products", "count the top 10 products, then review them"),
]


@pytest.mark.parametrize(("past", "new"), PARTICULARS)
async def test_goals_that_differ_in_particulars_share_a_decomposition_rebound(
    stack: Stack, past: str, new: str
) -> None:
    assert (await pursue(stack, past))[-1].HasField("goal_completed")
    events = await pursue(stack, new)
    assert events[-1].HasField("goal_completed"), events[-1]
    reused = decomposed(events)
    assert (reused.source, reused.similar_goal) == (pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL, past)
    own = await fresh(new)
    assert [(s.description, from_struct(s.parameters)) for s in reused.subtasks] == [
        (s.description, from_struct(s.parameters)) for s in own
    ]


@pytest.mark.parametrize(("past", "new"), SUBSTANCE)
async def test_goals_that_differ_in_substance_are_decomposed_afresh(stack: Stack, past: str, new: str) -> None:
    assert (await pursue(stack, past))[-1].HasField("goal_completed")
    events = await pursue(stack, new)
    assert decomposed(events).source == pb.DECOMPOSITION_SOURCE_MODEL
    assert [s.description for s in decomposed(events).subtasks] == [s.description for s in await fresh(new)]


async def test_only_goals_that_succeed_are_learnt_and_a_reuse_that_fails_is_demoted(
    stack: Stack, http_server: HttpServer
) -> None:
    http_server.routes["/ok"] = http_server.routes["/fine"] = echo
    nowhere = "fetch http://127.0.0.1:1/down then write it up"  # nothing listens: the call fails

    async def source(goal: str) -> tuple[int, str | None]:
        events = await pursue(stack, goal, max_replans=0)
        return decomposed(events).source, events[-1].WhichOneof("payload")

    assert await source(nowhere) == (pb.DECOMPOSITION_SOURCE_MODEL, "goal_failed")
    works = f"fetch {http_server.url}/ok then write it up"
    assert await source(works) == (pb.DECOMPOSITION_SOURCE_MODEL, "goal_completed")  # the failure was not learnt
    assert await source(nowhere) == (pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL, "goal_failed")  # reused, and failed
    fine = f"fetch {http_server.url}/fine then write it up"
    assert await source(fine) == (pb.DECOMPOSITION_SOURCE_MODEL, "goal_completed")  # the reuse was demoted
    assert await source(works) == (pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL, "goal_completed")  # learnt once it worked


async def test_decomposing_alone_teaches_nothing(stack: Stack) -> None:
    goal = "analyze the quarterly numbers, then write a memo"
    for _ in range(2):
        answer = await stack.coordinator.decompose_goal(pb.DecomposeGoalRequest(goal=goal, agents=AGENTS))
        assert answer.source == pb.DECOMPOSITION_SOURCE_MODEL  # no outcome: nothing learnt
