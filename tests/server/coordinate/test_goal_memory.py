"""The goal similarity indexes and the goal memory: scores against a direct computation, removal,
the cap on entries, what a store keeps across a reopen, unreadable entries, and replicas that learn
from each other through a shared store."""

from __future__ import annotations

import hashlib
import logging
import math
import random
import sqlite3
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierstack.server.auth import Role
from tierstack.server.auth.principal import Principal, act_as
from tierstack.server.coordinate import EmbeddingIndex, GoalMemory, NgramIndex
from tierstack.server.coordinate.postgres_store import PostgresGoalStore
from tierstack.server.coordinate.store import SqliteGoalStore
from tierstack.v1 import coordinator_service_pb2 as pb
from tools.postgres import LocalPostgres


def tf_idf_scores(goals: dict[str, str], query: str) -> dict[str, float]:
    """TF-IDF over character trigrams with smoothed IDF and cosine similarity, computed directly."""

    def grams(text: str) -> Counter[str]:
        normal = " " + " ".join(text.lower().split()) + " "
        return Counter(normal[i : i + 3] for i in range(max(len(normal) - 2, 1)))

    counted = {key: grams(text) for key, text in goals.items()}
    frequency = Counter(gram for found in counted.values() for gram in found)

    def unit(found: Counter[str]) -> dict[str, float]:
        vector = {g: c * (math.log((1 + len(goals)) / (1 + frequency[g])) + 1) for g, c in found.items()}
        norm = math.sqrt(sum(w * w for w in vector.values()))
        return {g: w / norm for g, w in vector.items()}

    wanted = unit(grams(query))
    return {
        key: min(sum(w * unit(found).get(g, 0.0) for g, w in wanted.items()), 1.0) for key, found in counted.items()
    }


words = st.sampled_from(["sales", "report", "compare", "regions", "write", "the", "French", "a", "data", "x"])
texts = st.lists(words, min_size=1, max_size=6).map(" ".join)
operations = st.lists(st.tuples(st.sampled_from("abcdefgh"), st.none() | texts), min_size=1, max_size=60)


@given(operations, texts)
async def test_ngram_scores_match_a_direct_computation(steps: list[tuple[str, str | None]], query: str) -> None:
    index = NgramIndex()
    stored: dict[str, str] = {}
    for key, text in steps:  # None removes the key; a text adds or replaces it
        if text is None:
            stored.pop(key, None)
            await index.remove([key])
        else:
            stored[key] = text
            await index.add([(key, text)])
    found = dict(await index.similar(query, limit=len(stored) + 1))
    expected = tf_idf_scores(stored, query)
    assert found.keys() == expected.keys()
    assert found == pytest.approx(expected)


async def test_the_ngram_index_stays_right_through_many_replacements_and_removals() -> None:
    index = NgramIndex()
    for round_ in range(300):  # enough dead rows to compact several times
        await index.add([(f"goal {round_ % 7}", f"write report number {round_}")])
    await index.remove(["goal 0", "goal 1", "never stored"])
    stored = {f"goal {round_ % 7}": f"write report number {round_}" for round_ in range(300) if round_ % 7 > 1}
    found = await index.similar("write report number 299", limit=10)
    assert dict(found) == pytest.approx(tf_idf_scores(stored, "write report number 299"))
    assert found[0][0] == "goal 5" and found[0][1] == pytest.approx(1.0)  # 299 = 7 * 42 + 5


async def embed(texts: Sequence[str]) -> list[list[float]]:
    """Vectors from the text's hash: equal texts get equal vectors, others nearly orthogonal ones."""
    return [[byte - 127.5 for byte in hashlib.sha256(text.encode()).digest()] for text in texts]


async def test_the_embedding_index_replaces_and_removes() -> None:
    index = EmbeddingIndex(embed)
    await index.add([("a", "alpha"), ("b", "beta"), ("b", "gamma")])  # the last text of a key wins
    [(key, score)] = await index.similar("gamma", limit=1)
    assert key == "b" and score == pytest.approx(1.0)
    for round_ in range(200):  # compacts on the way
        await index.add([(f"k{round_}", f"text {round_}")])
        await index.remove([f"k{round_ - 1}", "a"])
    found = await index.similar("text 199", limit=5)
    assert [key for key, _ in found][:1] == ["k199"] and found[0][1] == pytest.approx(1.0)
    assert sorted(key for key, _ in found) == ["b", "k199"]


def plan(description: str) -> list[pb.Subtask]:
    return [pb.Subtask(id="s1", description=description, required_capabilities=["writing"])]


async def recalled(memory: GoalMemory, goal: str) -> str | None:
    found = await memory.recall(goal, threshold=0.99, capabilities={"writing"})
    return None if found is None else found.subtasks[0].description


async def _sqlite(path: Path) -> SqliteGoalStore:
    store = SqliteGoalStore(path)
    await store.open()
    return store


async def test_the_goals_learnt_longest_ago_are_forgotten(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path / "goals.sqlite3")
    memory = GoalMemory(store, max_entries=3)
    topics = ["sales", "costs", "margins", "churn", "hiring", "forecast"]
    for topic in topics[:5]:
        await memory.learn(f"write the report on {topic}", plan(f"report on {topic}"))
    await memory.learn("write the report on margins", plan("report on margins, again"))  # now the newest
    await memory.learn("write the report on forecast", plan("report on forecast"))
    expected = [None, None, "report on margins, again", None, "report on hiring", "report on forecast"]
    assert len(memory) == 3
    assert [await recalled(memory, f"write the report on {topic}") for topic in topics] == expected
    await store.close()
    reopened = await _sqlite(tmp_path / "goals.sqlite3")
    try:
        reloaded = GoalMemory(reopened, max_entries=3)
        await reloaded.load()
        assert len(reloaded) == 3
        assert [await recalled(reloaded, f"write the report on {topic}") for topic in topics] == expected
    finally:
        await reopened.close()


async def test_an_unreadable_decomposition_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "goals.sqlite3"
    store = await _sqlite(path)
    memory = GoalMemory(store)
    await memory.learn("write the weekly report", plan("the report"))
    await memory.learn("write the monthly report", plan("another report"))
    await store.close()
    with sqlite3.connect(path) as db:  # as a disk error or a hand edit would leave it
        db.execute("UPDATE goal_memory SET subtasks = x'ff0aff' WHERE goal = 'write the monthly report'")
    reopened = await _sqlite(path)
    try:
        memory = GoalMemory(reopened)
        with caplog.at_level(logging.WARNING):
            await memory.load()
        assert len(memory) == 1 and await recalled(memory, "write the weekly report") == "the report"
    finally:
        await reopened.close()
    assert "1 stored decompositions cannot be read" in caplog.text


async def test_replicas_sharing_a_store_recall_what_each_other_learnt(postgres_server: LocalPostgres) -> None:
    url = postgres_server.new_database()
    stores = [PostgresGoalStore(url), PostgresGoalStore(url)]
    for store in stores:
        await store.open()
    try:
        first, second = (GoalMemory(store) for store in stores)
        await second.load()
        await first.learn("write the weekly report", plan("the report"))
        assert await recalled(second, "write the weekly report") == "the report"
        await first.learn("write the weekly report", plan("the report, better"))
        assert await recalled(second, "write the weekly report") == "the report, better"
        await second.learn("write the monthly report", plan("the monthly one"))
        assert await recalled(first, "write the monthly report") == "the monthly one"
    finally:
        for store in stores:
            await store.close()


async def test_goals_of_the_longest_kind_in_an_odd_alphabet_keep_the_index_small() -> None:
    generator = random.Random(3)
    goals = ["".join(chr(generator.randrange(0x4E00, 0x9FFF)) for _ in range(16_384)) for _ in range(300)]
    index = NgramIndex()
    tracemalloc.start()
    await index.add([(f"g{number}", goal) for number, goal in enumerate(goals)])
    found = await index.similar(goals[7])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found[0][0] == "g7" and found[0][1] == pytest.approx(1.0)
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB for 300 goals"


async def test_goals_are_forgotten_once_their_bytes_pass_the_budget() -> None:
    memory = GoalMemory(max_bytes=4096)
    subtasks = [pb.Subtask(id="s", description="x" * 1000)]
    for number in range(10):  # about 1 KiB each
        await memory.learn(f"goal {number}", subtasks)
    assert 1 <= len(memory) <= 4
    assert await memory.recall("goal 9", threshold=0.99, capabilities=set()) is not None
    assert await memory.recall("goal 0", threshold=0.99, capabilities=set()) is None


async def test_each_tenant_recalls_only_the_goals_it_learnt() -> None:
    memory = GoalMemory()
    subtasks = [pb.Subtask(id="s1", description="pull the Q2 sales", required_capabilities=["http"])]
    act_as(Principal("acme", "ada", Role.RUN))
    await memory.learn("compare the Q2 sales of every region", subtasks)
    act_as(Principal("globex", "bob", Role.RUN))
    assert await memory.recall("compare the Q2 sales of every region", threshold=0.5, capabilities={"http"}) is None
    act_as(Principal("acme", "eve", Role.RUN))
    recalled = await memory.recall("compare the Q3 sales of every region", threshold=0.5, capabilities={"http"})
    assert recalled is not None
    assert recalled.goal == "compare the Q2 sales of every region"  # the goal as written, not its key
    assert [s.description for s in recalled.subtasks] == ["pull the Q3 sales"]  # re-bound to the new goal


async def test_other_tenants_goals_never_crowd_out_a_tenants_own() -> None:
    """However many goals closer to the new one another tenant learnt, a tenant recalls its own."""
    memory = GoalMemory()

    def pull(quarter: str) -> list[pb.Subtask]:
        return [pb.Subtask(id="s1", description=f"pull the {quarter} sales", required_capabilities=["http"])]

    act_as(Principal("acme", "ada", Role.RUN))
    await memory.learn("compare the Q1 sales of every region", pull("Q1"))
    act_as(Principal("globex", "bob", Role.RUN))
    for number in range(3, 43):  # as like the new goal as acme's own: the same words, other particulars
        await memory.learn(f"compare the Q{number} sales of every region", pull(f"Q{number}"))
    act_as(Principal("acme", "ada", Role.RUN))
    recalled = await memory.recall("compare the Q2 sales of every region", threshold=0.5, capabilities={"http"})
    assert recalled is not None
    assert recalled.goal == "compare the Q1 sales of every region"
    assert recalled.subtasks[0].description == "pull the Q2 sales"
