"""The run store contract (``tierstack.server.conformance.runs``) on memory, SQLite and PostgreSQL,
and what SQLite alone must do (keep everything across a reopen, upgrade an old file)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tierstack.core.lifecycle import Fence, StaleOwnerError
from tierstack.server.conformance.runs import *  # noqa: F403 (the suite's tests, run here)
from tierstack.server.conformance.runs import OWNER, created, ended, event, new_run
from tierstack.server.orchestrate import MemoryRunStore, RunStore, SqliteRunStore
from tierstack.server.orchestrate.postgres_store import PostgresRunStore
from tierstack.v1 import orchestrator_service_pb2 as pb


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunStore]:
    backend: RunStore
    if request.param == "memory":
        backend = MemoryRunStore()
    elif request.param == "sqlite":
        backend = SqliteRunStore(tmp_path / "runs.sqlite3")
    else:
        backend = PostgresRunStore(request.getfixturevalue("postgres_server").new_database())
    await backend.open()
    yield backend
    await backend.close()


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    first = SqliteRunStore(path)
    await first.open()
    fence = await created(first, new_run("r1", request_id="req", state=pb.RUN_STATE_RUNNING))
    await first.write([pb.Run(run_id="r1", state=pb.RUN_STATE_COMPLETED)], [event("r1", 1)], {"r1": fence})
    await first.close()
    second = SqliteRunStore(path)
    await second.open()
    try:
        run = await second.get_run("r1")
        assert run is not None and run.state == pb.RUN_STATE_COMPLETED
        assert (await second.create_run(new_run("r2", request_id="req"), OWNER))[0].run_id == "r1"
        with pytest.raises(StaleOwnerError):  # the fence is kept too
            await second.write([], [event("r1", 2)], {"r1": Fence(OWNER, 2)})
        assert [e.sequence for e in await second.events("r1", after_sequence=0)] == [1]
    finally:
        await second.close()


async def test_sqlite_upgrades_a_database_of_the_first_schema(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    with sqlite3.connect(path) as old:  # the schema before runs had an end time
        old.executescript(FIRST_SCHEMA)
        for run_id, state, end_ns in (("done", pb.RUN_STATE_COMPLETED, 1_000), ("busy", pb.RUN_STATE_RUNNING, None)):
            stored = new_run(run_id, created_ns=10)
            run = ended(run_id, state, end_ns)
            run.create_time.CopyFrom(stored.run.create_time)
            old.execute(
                "INSERT INTO runs VALUES (?, NULL, ?, 10, ?, ?, ?)",
                (run_id, state, run.SerializeToString(), b"", b""),
            )
    old.close()
    store = SqliteRunStore(path)
    await store.open()
    try:
        assert await store.finished_before(2_000, limit=10) == ["done"]
        assert (await store.get_run("busy")) is not None
    finally:
        await store.close()
    again = SqliteRunStore(path)  # opening an upgraded database again changes nothing
    await again.open()
    try:
        assert await again.finished_before(2_000, limit=10) == ["done"]
    finally:
        await again.close()


FIRST_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    create_ns INTEGER NOT NULL,
    run BLOB NOT NULL,
    workflow BLOB NOT NULL,
    limits BLOB NOT NULL
);
CREATE INDEX runs_by_time ON runs (create_ns DESC, run_id DESC);
CREATE TABLE events (
    run_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (run_id, sequence)
) WITHOUT ROWID;
"""
