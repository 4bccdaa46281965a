"""Run storage: one interface, with an in-memory backend and SQLite (aiosqlite, WAL) behind it."""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from google.protobuf.message import DecodeError

from tierstack.v1 import common_pb2, orchestrator_service_pb2

Run = orchestrator_service_pb2.Run
RunEvent = orchestrator_service_pb2.RunEvent
_log = logging.getLogger(__name__)


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
    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent]) -> None:
        """Replaces the stored state of existing runs and appends events, all or nothing; an event
        already stored (same run, same sequence) is kept as it is, so a batch may be written again."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> Run | None:
        """Returns a run, or None."""

    @abc.abstractmethod
    async def get_stored(self, run_id: str) -> StoredRun | None:
        """Returns a run with its workflow and limits, or None."""

    @abc.abstractmethod
    async def list_runs(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[Run]:
        """Returns up to ``limit`` runs, newest first, older than the (create time in ns, run id)
        cursor ``after``, keeping only ``state`` unless it is 0."""

    @abc.abstractmethod
    async def unfinished_runs(self) -> list[StoredRun]:
        """Returns every run that is pending or running, oldest first."""

    @abc.abstractmethod
    async def events(self, run_id: str, *, after_sequence: int) -> list[RunEvent]:
        """Returns a run's events with a sequence number above ``after_sequence``, in order."""

    @abc.abstractmethod
    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        """Returns the ids of up to ``limit`` finished runs (completed, failed or cancelled) that
        ended before ``end_ns`` (ns since the epoch), those that ended first first."""

    @abc.abstractmethod
    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Deletes runs and their events; their request ids may be used again. Unknown ids are
        ignored."""


_UNFINISHED = (orchestrator_service_pb2.RUN_STATE_PENDING, orchestrator_service_pb2.RUN_STATE_RUNNING)
#: The states a run ends in; a run in one of them never changes again.
FINISHED = (
    orchestrator_service_pb2.RUN_STATE_COMPLETED,
    orchestrator_service_pb2.RUN_STATE_FAILED,
    orchestrator_service_pb2.RUN_STATE_CANCELLED,
)


def _end_ns(run: Run) -> int | None:
    """Returns when a finished run ended (when it was created, if that was not recorded); None
    for a run that has not."""
    if run.state not in FINISHED:
        return None
    return (run.end_time if run.HasField("end_time") else run.create_time).ToNanoseconds()


class MemoryRunStore(RunStore):
    """Keeps runs in this process only; for tests and throwaway runs."""

    def __init__(self) -> None:
        self._runs: dict[str, StoredRun] = {}
        self._by_request: dict[str, str] = {}
        self._events: dict[str, dict[int, bytes]] = {}

    async def open(self) -> None:
        """Nothing to prepare."""

    async def close(self) -> None:
        """Nothing to release."""

    async def create_run(self, stored: StoredRun) -> Run:
        request_id = stored.run.request_id
        if request_id and request_id in self._by_request:
            return Run.FromString(self._runs[self._by_request[request_id]].run.SerializeToString())
        self._runs[stored.run.run_id] = StoredRun(
            Run.FromString(stored.run.SerializeToString()), stored.workflow, stored.limits
        )
        self._events[stored.run.run_id] = {}
        if request_id:
            self._by_request[request_id] = stored.run.run_id
        return stored.run

    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent]) -> None:
        for run in runs:
            kept = self._runs[run.run_id]
            self._runs[run.run_id] = StoredRun(Run.FromString(run.SerializeToString()), kept.workflow, kept.limits)
        for event in events:
            stored = self._events[event.run_id]
            if event.sequence not in stored:
                stored[event.sequence] = event.SerializeToString()

    async def get_run(self, run_id: str) -> Run | None:
        stored = await self.get_stored(run_id)
        return stored.run if stored else None

    async def get_stored(self, run_id: str) -> StoredRun | None:
        stored = self._runs.get(run_id)
        if stored is None:
            return None
        return StoredRun(Run.FromString(stored.run.SerializeToString()), stored.workflow, stored.limits)

    async def list_runs(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[Run]:
        keyed = sorted(((s.run.create_time.ToNanoseconds(), run_id) for run_id, s in self._runs.items()), reverse=True)
        found = []
        for key in keyed:
            run = self._runs[key[1]].run
            if (after is None or key < after) and (not state or run.state == state):
                found.append(Run.FromString(run.SerializeToString()))
                if len(found) == limit:
                    break
        return found

    async def unfinished_runs(self) -> list[StoredRun]:
        unfinished = [s for s in self._runs.values() if s.run.state in _UNFINISHED]
        unfinished.sort(key=lambda s: s.run.create_time.ToNanoseconds())
        return [StoredRun(Run.FromString(s.run.SerializeToString()), s.workflow, s.limits) for s in unfinished]

    async def events(self, run_id: str, *, after_sequence: int) -> list[RunEvent]:
        stored = self._events.get(run_id, {})
        return [RunEvent.FromString(stored[sequence]) for sequence in sorted(stored) if sequence > after_sequence]

    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        ended = sorted(
            (ended, run_id)
            for run_id, s in self._runs.items()
            if (ended := _end_ns(s.run)) is not None and ended < end_ns
        )
        return [run_id for _, run_id in ended[:limit]]

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        deleted = set(run_ids)
        for run_id in deleted:
            self._runs.pop(run_id, None)
            self._events.pop(run_id, None)
        self._by_request = {request: run_id for request, run_id in self._by_request.items() if run_id not in deleted}


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
# Numbered migrations from the first schema; ``PRAGMA user_version`` counts those applied.
_MIGRATIONS = (
    # 1: the end time of finished runs (filled in below for those stored before), for retention.
    """
    ALTER TABLE runs ADD COLUMN end_ns INTEGER;
    CREATE INDEX IF NOT EXISTS runs_by_end ON runs (end_ns) WHERE end_ns IS NOT NULL;
    """,
)


def _stored(row: Any) -> StoredRun:
    run, workflow, limits = row
    return StoredRun(
        Run.FromString(run),
        orchestrator_service_pb2.Workflow.FromString(workflow),
        common_pb2.ResourceLimits.FromString(limits),
    )


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
        await self._migrate()

    async def _migrate(self) -> None:
        async with self._conn.execute("PRAGMA user_version") as rows:
            row = await rows.fetchone()
        version = row[0] if row else 0
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            await self._conn.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")
            if number == 1:
                await self._fill_end_times()

    async def _fill_end_times(self) -> None:
        marks = ", ".join("?" * len(FINISHED))
        async with self._conn.execute(f"SELECT run FROM runs WHERE state IN ({marks})", FINISHED) as rows:
            ended = [(_end_ns(run), run.run_id) for run in (Run.FromString(row[0]) for row in await rows.fetchall())]
        await self._conn.executemany("UPDATE runs SET end_ns = ? WHERE run_id = ?", ended)
        await self._conn.commit()

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
        if row is None:  # the run holding the request id was deleted in between: try again
            return await self.create_run(stored)
        return Run.FromString(row[0])

    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent]) -> None:
        await self._conn.executemany(
            "UPDATE runs SET state = ?, run = ?, end_ns = ? WHERE run_id = ?",
            [(run.state, run.SerializeToString(), _end_ns(run), run.run_id) for run in runs],
        )
        await self._conn.executemany(
            "INSERT OR IGNORE INTO events (run_id, sequence, event) VALUES (?, ?, ?)",
            [(event.run_id, event.sequence, event.SerializeToString()) for event in events],
        )
        await self._conn.commit()

    async def get_run(self, run_id: str) -> Run | None:
        async with self._conn.execute("SELECT run FROM runs WHERE run_id = ?", (run_id,)) as rows:
            row = await rows.fetchone()
        return Run.FromString(row[0]) if row else None

    async def get_stored(self, run_id: str) -> StoredRun | None:
        async with self._conn.execute("SELECT run, workflow, limits FROM runs WHERE run_id = ?", (run_id,)) as rows:
            row = await rows.fetchone()
        return _stored(row) if row else None

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
        """Returns every run that is pending or running, oldest first; a run whose stored record
        cannot be read is marked failed (and logged) rather than returned."""
        marks = ", ".join("?" * len(_UNFINISHED))
        query = f"SELECT run_id, run, workflow, limits FROM runs WHERE state IN ({marks}) ORDER BY create_ns"
        async with self._conn.execute(query, _UNFINISHED) as rows:
            found, unreadable = [], []
            for run_id, *row in await rows.fetchall():
                try:
                    found.append(_stored(row))
                except DecodeError:
                    unreadable.append(run_id)
        if unreadable:
            _log.warning("%d stored runs cannot be read and are marked failed: %s", len(unreadable), unreadable)
            await self._conn.executemany(
                "UPDATE runs SET state = ? WHERE run_id = ?",
                [(orchestrator_service_pb2.RUN_STATE_FAILED, run_id) for run_id in unreadable],
            )
            await self._conn.commit()
        return found

    async def events(self, run_id: str, *, after_sequence: int) -> list[RunEvent]:
        async with self._conn.execute(
            "SELECT event FROM events WHERE run_id = ? AND sequence > ? ORDER BY sequence",
            (run_id, after_sequence),
        ) as rows:
            return [RunEvent.FromString(row[0]) for row in await rows.fetchall()]

    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        async with self._conn.execute(
            "SELECT run_id FROM runs WHERE end_ns IS NOT NULL AND end_ns < ? ORDER BY end_ns LIMIT ?", (end_ns, limit)
        ) as rows:
            return [row[0] for row in await rows.fetchall()]

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        parameters = [(run_id,) for run_id in run_ids]
        await self._conn.executemany("DELETE FROM events WHERE run_id = ?", parameters)
        await self._conn.executemany("DELETE FROM runs WHERE run_id = ?", parameters)
        await self._conn.commit()
