"""Decomposition in order — similar past goal, template, model — and learning from goals that
succeed, across restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.helpers import open_stack, start_tier
from tierstack.client import CoordinatorClient
from tierstack.core.values import from_struct
from tierstack.server import Settings
from tierstack.server.coordinate import GoalMemory, NgramIndex, load_templates
from tierstack.server.coordinate.store import Learnt, SqliteGoalStore
from tierstack.v1 import coordinator_service_pb2 as pb

AGENTS = [
    pb.Agent(id="researcher", capabilities=["http", "general"], max_concurrent_tasks=2),
    pb.Agent(id="analyst", capabilities=["analysis"], max_concurrent_tasks=2),
    pb.Agent(id="writer", capabilities=["writing"], max_concurrent_tasks=2),
]


async def test_character_ngrams_tell_near_goals_from_others() -> None:
    index = NgramIndex()
    await index.add([("a", "analyze sales and compare regions, then write a summary")])
    await index.add([("b", "translate the manual into French")])
    [(best, score), (_, other)] = await index.similar("analyze the sales and compare the regions then write a summary")
    assert best == "a" and score >= 0.85 and other < 0.2
    [(exact, same)] = await index.similar("translate the manual into French", limit=1)
    assert exact == "b" and same == pytest.approx(1.0)
    assert (await index.similar("bake a cake", limit=1))[0][1] < 0.2


async def test_memory_survives_a_restart_and_respects_capabilities(tmp_path: Path) -> None:
    store = SqliteGoalStore(tmp_path / "goals.sqlite3")
    await store.open()
    subtasks = [pb.Subtask(id="s1", description="write it", required_capabilities=["writing"])]
    await GoalMemory(store).learn("write the weekly report", subtasks)
    await store.close()
    store = SqliteGoalStore(tmp_path / "goals.sqlite3")
    await store.open()
    second = GoalMemory(store)
    await second.load()
    await store.close()
    recalled = await second.recall("write the weekly report!", threshold=0.85, capabilities={"writing"})
    assert recalled is not None and recalled.goal == "write the weekly report"
    assert [s.id for s in recalled.subtasks] == ["s1"]
    assert await second.recall("write the weekly report", threshold=0.85, capabilities={"http"}) is None
    assert await second.recall("something else entirely", threshold=0.85, capabilities={"writing"}) is None


def test_a_malformed_template_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\npattern: '('\nsubtasks: []\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not a goal template"):
        load_templates([tmp_path])


async def test_sources_come_in_order_and_a_similar_goal_is_one_that_succeeded(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "translate.yaml").write_text(
        "name: translate\n"
        "pattern: '^translate (?P<text>.+) into (?P<language>\\w+)$'\n"
        "subtasks:\n"
        "  - {id: t1, description: translate $text into $language, required_capabilities: [writing],\n"
        "     tool: text.template, parameters: {template: '$language: $text'}}\n"
    )
    settings = Settings(data_dir=tmp_path / "data", templates_dir=templates)

    async def decompose(goal: str, agents: list[pb.Agent] = AGENTS) -> pb.DecomposeGoalResponse:
        server = await start_tier("coordinate", settings)
        try:
            async with CoordinatorClient(server.target) as client:
                return await client.decompose_goal(pb.DecomposeGoalRequest(goal=goal, agents=agents))
        finally:
            await server.stop()

    built_in = await decompose("summarise https://example.org/news")
    assert (built_in.source, built_in.producer) == (pb.DECOMPOSITION_SOURCE_TEMPLATE, "summarise-url")
    assert from_struct(built_in.subtasks[0].parameters) == {"url": "https://example.org/news", "method": "GET"}
    mine = await decompose("translate the menu into Italian")
    assert (mine.source, mine.producer) == (pb.DECOMPOSITION_SOURCE_TEMPLATE, "translate")
    assert mine.subtasks[0].description == "translate the menu into Italian"

    goal = "analyze the quarterly numbers and compare teams, then write a memo"
    fresh = await decompose(goal)
    assert (fresh.source, fresh.producer) == (pb.DECOMPOSITION_SOURCE_MODEL, "local")
    async with open_stack(settings) as stack:  # a goal that succeeds is learnt
        started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal, agents=AGENTS))
        assert [e async for e in stack.coordinator.watch_goal(started.goal.goal_id)][-1].HasField("goal_completed")
    again = await decompose("Analyze the quarterly numbers and compare the teams, then write a memo!")
    assert again.source == pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL and again.producer == f"similar goal: {goal}"
    assert list(again.subtasks) == list(fresh.subtasks)
    writers_only = [pb.Agent(id="writer", capabilities=["writing"])]
    fallback = await decompose(goal, writers_only)
    assert fallback.source == pb.DECOMPOSITION_SOURCE_MODEL  # the analysts it needs are not at hand


GOAL = "analyze the quarterly numbers and compare teams, then write a memo"
LIKE_GOAL = "analyze the quarterly numbers and compare the teams, then write a memo"


async def _learnt(settings: Settings) -> list[Learnt]:
    """Returns what the goal memory of a Coordinate server keeps in its store now."""
    store = SqliteGoalStore.in_folder(settings.sqlite_dir)
    await store.open()
    try:
        return await store.learnt(after=0, limit=100)
    finally:
        await store.close()


async def test_goal_memory_keeps_one_entry_per_goal_and_forgets_the_oldest(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", goal_memory_entries=2)
    async with open_stack(settings) as stack:

        async def source(goal: str) -> int:
            started = await stack.coordinator.start_goal(pb.StartGoalRequest(goal=goal, agents=AGENTS))
            events = [e async for e in stack.coordinator.watch_goal(started.goal.goal_id)]
            assert events[-1].HasField("goal_completed"), events[-1]
            return events[0].goal_decomposed.source

        assert await source(GOAL) == pb.DECOMPOSITION_SOURCE_MODEL
        assert await source(LIKE_GOAL) == pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL
        assert await source(GOAL) == pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL
        learnt = [entry.goal for entry in await _learnt(settings)]
        assert learnt == [LIKE_GOAL, GOAL]  # each learnt once, the newest last
        assert await source("collect the sales data, then draw a chart") == pb.DECOMPOSITION_SOURCE_MODEL
        assert await source("research the market and write a brief") == pb.DECOMPOSITION_SOURCE_MODEL
        assert await source(LIKE_GOAL) == pb.DECOMPOSITION_SOURCE_MODEL  # forgotten: two newer goals


async def test_unreadable_goal_memory_does_not_stop_coordinate(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    store = SqliteGoalStore.in_folder(settings.sqlite_dir)
    await store.open()
    memory = GoalMemory(store)
    await memory.learn("write the weekly report", [pb.Subtask(id="s1", description="unreadable")])
    await memory.learn(GOAL, [pb.Subtask(id="s1", description="from the store")])
    await store.close()
    with sqlite3.connect(settings.sqlite_dir / SqliteGoalStore.FILE) as db:  # as a disk error would leave it
        db.execute("UPDATE goal_memory SET subtasks = x'ff0aff' WHERE goal = 'write the weekly report'")
    server = await start_tier("coordinate", settings)
    try:
        async with CoordinatorClient(server.target) as client:
            again = await client.decompose_goal(pb.DecomposeGoalRequest(goal=LIKE_GOAL, agents=AGENTS))
    finally:
        await server.stop()
    assert again.source == pb.DECOMPOSITION_SOURCE_SIMILAR_GOAL
    assert [s.description for s in again.subtasks] == ["from the store"]
