"""Run storage: one interface, and SQLite (through aiosqlite, in WAL mode) behind it."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from tierstack.v1 import common_pb2, orchestrator_service_pb2

Run = orchestrator_service_pb2.Run
RunEvent = orchestrator_service_pb2.RunEvent


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run with what it needs to be run again: its workflow and limits."""

    run: Run
    workflow: orchestrator_service_pb2.Workflow
    limits: common_pb2.ResourceLimits


class RunStore(abc.ABC):
    """Keeps runs and their events. Messages are stored in their protobuf wire form."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Prepares the store for use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the store's resources."""

    @abc.abstractmethod
    async def create_run(self, stored: StoredRun) -> Run:
        """Stores a new run and returns it; when its ``request_id`` is already taken, stores nothing
        and returns the run that holds it."""

    @abc.abstractmethod
    async def save_run(self, run: Run) -> None:
        """Replaces the stored state of an existing run."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> Run | None:
        """Returns a run, or None."""

    @abc.abstractmethod
    async def list_runs(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[Run]:
        """Returns up to ``limit`` runs, newest first, older than the (create time in ns, run id)
        cursor ``after``, keeping only ``state`` unless it is 0."""

    @abc.abstractmethod
    async def unfinished_runs(self) -> list[StoredRun]:
        """Returns every run that is pending, running or paused."""

    @abc.abstractmethod
    async def append_events(self, run_id: str, events: Sequence[RunEvent]) -> None:
        """Stores events of a run."""

    @abc.abstractmethod
    async def events(self, run_id: str, *, after_sequence: int) -> list[RunEvent]:
        """Returns a run's events with a sequence number above ``after_sequence``, in order."""


_UNFINISHED = (
    orchestrator_service_pb2.RUN_STATE_PENDING,
    orchestrator_service_pb2.RUN_STATE_RUNNING,
    orchestrator_service_pb2.RUN_STATE_PAUSED,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    create_ns INTEGER NOT NULL,
    run BLOB NOT NULL,
    workflow BLOB NOT NULL,
    limits BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (create_ns DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (run_id, sequence)
) WITHOUT ROWID;
"""


class SqliteRunStore(RunStore):
    """Stores runs in one SQLite file (WAL, synchronous=NORMAL), off the event loop via aiosqlite.

    Args:
        path: The database file; its folder is created when missing.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the run store is not open")
        return self._db

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def create_run(self, stored: StoredRun) -> Run:
        run = stored.run
        cursor = await self._conn.execute(
            "INSERT INTO runs (run_id, request_id, state, create_ns, run, workflow, limits)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
            (
                run.run_id,
                run.request_id or None,
                run.state,
                run.create_time.ToNanoseconds(),
                run.SerializeToString(),
                stored.workflow.SerializeToString(),
                stored.limits.SerializeToString(),
            ),
        )
        await self._conn.commit()
        if cursor.rowcount == 1:
            return run
        async with self._conn.execute("SELECT run FROM runs WHERE request_id = ?", (run.request_id,)) as rows:
            row = await rows.fetchone()
        assert row is not None  # the conflicting row exists: runs are never deleted
        return Run.FromString(row[0])

    async def save_run(self, run: Run) -> None:
        await self._conn.execute(
            "UPDATE runs SET state = ?, run = ? WHERE run_id = ?",
            (run.state, run.SerializeToString(), run.run_id),
        )
        await self._conn.commit()

    async def get_run(self, run_id: str) -> Run | None:
        async with self._conn.execute("SELECT run FROM runs WHERE run_id = ?", (run_id,)) as rows:
            row = await rows.fetchone()
        return Run.FromString(row[0]) if row else None

    async def list_runs(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[Run]:
        clauses: list[str] = []
        params: list[int | str] = []
        if after is not None:
            clauses.append("(create_ns, run_id) < (?, ?)")
            params.extend(after)
        if state:
            clauses.append("state = ?")
            params.append(state)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = f"SELECT run FROM runs {where} ORDER BY create_ns DESC, run_id DESC LIMIT ?"
        async with self._conn.execute(query, (*params, limit)) as rows:
            return [Run.FromString(row[0]) for row in await rows.fetchall()]

    async def unfinished_runs(self) -> list[StoredRun]:
        marks = ", ".join("?" * len(_UNFINISHED))
        query = f"SELECT run, workflow, limits FROM runs WHERE state IN ({marks}) ORDER BY create_ns"
        async with self._conn.execute(query, _UNFINISHED) as rows:
            return [
                StoredRun(
                    Run.FromString(run),
                    orchestrator_service_pb2.Workflow.FromString(workflow),
                    common_pb2.ResourceLimits.FromString(limits),
                )
                for run, workflow, limits in await rows.fetchall()
            ]

    async def append_events(self, run_id: str, events: Sequence[RunEvent]) -> None:
        await self._conn.executemany(
            "INSERT INTO events (run_id, sequence, event) VALUES (?, ?, ?)",
            [(run_id, event.sequence, event.SerializeToString()) for event in events],
        )
        await self._conn.commit()

    async def events(self, run_id: str, *, after_sequence: int) -> list[RunEvent]:
        async with self._conn.execute(
            "SELECT event FROM events WHERE run_id = ? AND sequence > ? ORDER BY sequence",
            (run_id, after_sequence),
        ) as rows:
            return [RunEvent.FromString(row[0]) for row in await rows.fetchall()]
