"""The goal store contract (``tierstack.server.conformance.goals``) on memory, SQLite and PostgreSQL,
and what SQLite alone must do (keep everything across a reopen)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tierstack.core.lifecycle import GOAL_LIFECYCLE, Fence, IllegalTransitionError
from tierstack.server.conformance.goals import *  # noqa: F403 (the suite's tests, run here)
from tierstack.server.conformance.goals import new_goal, note
from tierstack.server.coordinate.postgres_store import PostgresGoalStore
from tierstack.server.coordinate.store import GoalStore, MemoryGoalStore, SqliteGoalStore
from tierstack.v1 import coordinator_service_pb2 as pb


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GoalStore]:
    backend: GoalStore
    if request.param == "memory":
        backend = MemoryGoalStore()
    elif request.param == "sqlite":
        backend = SqliteGoalStore(tmp_path / "goals.sqlite3")
    else:
        backend = PostgresGoalStore(request.getfixturevalue("postgres_server").new_database())
    await backend.open()
    yield backend
    await backend.close()


async def test_sqlite_keeps_goals_owners_and_events_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "goals.sqlite3"
    first = SqliteGoalStore(path)
    await first.open()
    goal, fence = await first.create_goal(new_goal("g1", request_id="req"), "a")
    assert fence is not None
    await first.write(goal, fence, [note("one")], transition="start")
    await first.close()
    second = SqliteGoalStore(path)
    await second.open()
    try:
        assert (await second.create_goal(new_goal("g2", request_id="req"), "b"))[0].goal_id == "g1"
        assert [(g.goal_id, f) for g, f in await second.take_over("b", limit=None, at_start=True)] == [
            ("g1", Fence("b", 2))
        ]
        assert [e.sequence for e in await second.events("g1", after_sequence=0)] == [1]
    finally:
        await second.close()


def test_the_goal_lifecycle_ends_in_its_final_states() -> None:
    final = {state for state in pb.GoalState.values() if GOAL_LIFECYCLE.is_final(state)}
    assert final == {
        pb.GOAL_STATE_UNSPECIFIED,
        pb.GOAL_STATE_COMPLETED,
        pb.GOAL_STATE_FAILED,
        pb.GOAL_STATE_CANCELLED,
    }
    assert GOAL_LIFECYCLE.next("g", pb.GOAL_STATE_PENDING, "start") == pb.GOAL_STATE_RUNNING
    with pytest.raises(IllegalTransitionError):
        GOAL_LIFECYCLE.next("g", pb.GOAL_STATE_PENDING, "complete")  # a goal runs before it completes
