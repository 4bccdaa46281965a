"""Run storage: one interface, with an in-memory backend and SQLite (aiosqlite, WAL) behind it.

Every run has one owner at a time, named with its epoch by a :class:`~tierstack.core.lifecycle.Fence`:
its creator, or whoever claimed it since (an orchestrator resuming it after a restart, a caller
resuming it after a pause). Every write names the writer's fence; the store checks it, and that the
run's state follows the stored one in :data:`~tierstack.core.lifecycle.RUN_LIFECYCLE`, in the same
transaction that writes, so a stale or concurrent writer is refused instead of overwriting the run
or having its events silently dropped.

An owner holds its runs under a lease that it renews (``renew``) while it lives; a run whose lease has
passed is taken over by another owner (``take_over``), which fences the first out. A store that
several processes share (PostgreSQL) respects leases from the start; one that a single process uses
(memory, SQLite) lets a starting process take over every unfinished run, since any other owner can
only have been an earlier process. Requests to stop a run (``request_control``) wait in the store
for its owner, wherever they were made.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from google.protobuf.message import DecodeError

from tierstack.core.errors import NotFoundError
from tierstack.core.lifecycle import (
    DEFAULT_LEASE_SECONDS,
    RUN_LIFECYCLE,
    Fence,
    IllegalTransitionError,
    StaleOwnerError,
    lease_end,
)
from tierstack.server import sqlite
from tierstack.server.auth.principal import namespaced
from tierstack.server.auth.quota import too_many_unfinished
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
    """Keeps runs and their events. Messages are stored in their protobuf wire form.

    Attributes:
        shared: Whether several processes may use the store at once.
        lease_seconds: How long a claim holds a run without being renewed.
    """

    shared = False
    lease_seconds = DEFAULT_LEASE_SECONDS

    @abc.abstractmethod
    async def open(self) -> None:
        """Prepares the store for use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the store's resources."""

    @abc.abstractmethod
    async def create_run(self, stored: StoredRun, owner: str, *, most: int = 0) -> tuple[Run, Fence | None]:
        """Stores a new run owned by ``owner`` at epoch 1 and returns it with its fence; when its
        ``request_id`` is already taken in its tenant, stores nothing and returns the run that holds
        it, without a fence.

        Args:
            most: The most unfinished runs (not yet ended, paused ones too) the run's tenant may have
                with this one, checked in the same transaction as the insert; 0 for no limit.

        Raises:
            ResourceExhaustedError: The tenant has ``most`` unfinished runs already.
        """

    @abc.abstractmethod
    async def claim(self, run_id: str, owner: str, transition: str) -> tuple[StoredRun, Fence]:
        """Makes ``owner`` the owner of a run at the next epoch, moving it to the state the lifecycle
        gives ``transition`` (``claim``: the same state; ``resume``, ``cancel``); every write under an
        earlier fence is refused from then on. Two claims of one run cannot both succeed from the same
        state.

        Raises:
            NotFoundError: No run has that id.
            IllegalTransitionError: The transition does not apply to the run's stored state.
        """

    @abc.abstractmethod
    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent], fences: Mapping[str, Fence]) -> None:
        """Replaces the stored record of runs and appends events, all or nothing, after checking, for
        every run written to, the fence in ``fences`` and that a record's state follows the stored one.

        Raises:
            StaleOwnerError: A run has another owner, or a later epoch, than its fence says; nothing
                is written (the error's metadata names the run).
            IllegalTransitionError: A record's state cannot follow the stored one.
        """

    @abc.abstractmethod
    async def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        """Returns a run (of ``tenant`` only, unless it is None), or None."""

    @abc.abstractmethod
    async def get_stored(self, run_id: str, *, tenant: str | None = None) -> StoredRun | None:
        """Returns a run (of ``tenant`` only, unless it is None) with its workflow and limits, or None."""

    @abc.abstractmethod
    async def list_runs(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Run]:
        """Returns up to ``limit`` runs, newest first, older than the (create time in ns, run id)
        cursor ``after``, keeping only ``state`` unless it is 0, and only ``tenant``'s unless it is
        None."""

    @abc.abstractmethod
    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[StoredRun, Fence]]:
        """Claims for ``owner`` (the ``claim`` transition, with a new lease) up to ``limit`` (None: all)
        pending or running runs that no live owner holds, oldest first, and returns them with their fences: those
        whose lease has passed, but for the runs ``owner`` drives (``driven``: a lease it renewed late is
        no reason to take them from itself), and, ``at_start``, those held under ``owner``'s own name (an
        earlier life of the same replica) or, on a store that is not shared, every one. A run
        whose stored record cannot be read is failed (RUN_NOT_RESUMABLE) instead, so that it can still
        be read, listed and deleted."""

    @abc.abstractmethod
    async def renew(self, owner: str, run_ids: Collection[str]) -> set[str]:
        """Extends the lease of those of ``run_ids`` that ``owner`` holds and that are pending or
        running, and returns every one of them that ``owner`` still holds, whatever its state."""

    @abc.abstractmethod
    async def request_control(self, run_id: str, kind: str, reason: str) -> None:
        """Leaves a request (``cancel`` or ``pause``, and why) for the owner of a run; a later request
        replaces an earlier one that was not taken yet."""

    @abc.abstractmethod
    async def take_controls(self, owner: str) -> list[tuple[str, str, str]]:
        """Removes and returns the requests left for the runs ``owner`` holds, as (run id, kind, reason)."""

    async def wait_changed(self, run_id: str, timeout: float) -> None:
        """Returns once the run may have changed (new events, a new state), or after ``timeout`` seconds.
        A store that can tell (PostgreSQL, by notifications) returns early."""
        await asyncio.sleep(timeout)

    @abc.abstractmethod
    async def events(self, run_id: str, *, after_sequence: int, limit: int | None = None) -> list[RunEvent]:
        """Returns a run's events with a sequence number above ``after_sequence``, in order: the
        first ``limit`` of them, or all."""

    @abc.abstractmethod
    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        """Returns the ids of up to ``limit`` finished runs (completed, failed or cancelled) that
        ended before ``end_ns`` (ns since the epoch), those that ended first first."""

    @abc.abstractmethod
    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Deletes runs and their events; their request ids may be used again. Unknown ids are
        ignored."""


UNFINISHED = (orchestrator_service_pb2.RUN_STATE_PENDING, orchestrator_service_pb2.RUN_STATE_RUNNING)
#: The states a run ends in; a run in one of them never changes again.
FINISHED = (
    orchestrator_service_pb2.RUN_STATE_COMPLETED,
    orchestrator_service_pb2.RUN_STATE_FAILED,
    orchestrator_service_pb2.RUN_STATE_CANCELLED,
)


def check_follows(run: Run, stored_state: int) -> None:
    """Refuses a record whose state cannot follow the stored one.

    Raises:
        IllegalTransitionError: It cannot.
    """
    if not RUN_LIFECYCLE.follows(stored_state, run.state):
        names = RUN_LIFECYCLE.names
        raise IllegalTransitionError(
            f"run {run.run_id} is {names.get(stored_state, stored_state)}: it cannot become"
            f" {names.get(run.state, run.state)}",
            metadata={"run_id": run.run_id, "state": str(names.get(stored_state, stored_state))},
        )


def request_key(run: Run) -> str | None:
    """Returns what makes a run's request id unique: the id within the run's tenant (None without one)."""
    return namespaced(run.tenant_id, run.request_id) if run.request_id else None


def ended_ns(run: Run) -> int | None:
    """Returns when a finished run ended (when it was created, if that was not recorded); None
    for a run that has not."""
    if run.state not in FINISHED:
        return None
    return (run.end_time if run.HasField("end_time") else run.create_time).ToNanoseconds()


class MemoryRunStore(RunStore):
    """Keeps runs in this process only; for tests and throwaway runs."""

    def __init__(self, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.lease_seconds = lease_seconds
        self._runs: dict[str, StoredRun] = {}
        self._fences: dict[str, Fence] = {}
        self._leases: dict[str, int] = {}
        self._controls: dict[str, tuple[str, str]] = {}
        self._by_request: dict[str, str] = {}
        self._events: dict[str, dict[int, bytes]] = {}

    async def open(self) -> None:
        """Nothing to prepare."""

    async def close(self) -> None:
        """Nothing to release."""

    async def create_run(self, stored: StoredRun, owner: str, *, most: int = 0) -> tuple[Run, Fence | None]:
        request_id = request_key(stored.run)
        if request_id and request_id in self._by_request:
            return Run.FromString(self._runs[self._by_request[request_id]].run.SerializeToString()), None
        tenant = stored.run.tenant_id
        if most and sum(k.run.tenant_id == tenant and ended_ns(k.run) is None for k in self._runs.values()) >= most:
            raise too_many_unfinished("runs", most)
        self._runs[stored.run.run_id] = StoredRun(
            Run.FromString(stored.run.SerializeToString()), stored.workflow, stored.limits
        )
        self._fences[stored.run.run_id] = fence = Fence(owner, 1)
        self._leases[stored.run.run_id] = lease_end(self.lease_seconds)
        self._events[stored.run.run_id] = {}
        if request_id:
            self._by_request[request_id] = stored.run.run_id
        return stored.run, fence

    async def claim(self, run_id: str, owner: str, transition: str) -> tuple[StoredRun, Fence]:
        kept = self._runs.get(run_id)
        if kept is None:
            raise NotFoundError("run", run_id)
        kept.run.state = RUN_LIFECYCLE.next(run_id, kept.run.state, transition)  # type: ignore[assignment]
        self._fences[run_id] = fence = Fence(owner, self._fences[run_id].epoch + 1)
        self._leases[run_id] = lease_end(self.lease_seconds)
        return StoredRun(Run.FromString(kept.run.SerializeToString()), kept.workflow, kept.limits), fence

    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent], fences: Mapping[str, Fence]) -> None:
        for run_id in {run.run_id for run in runs} | {event.run_id for event in events}:
            if self._fences.get(run_id) != fences.get(run_id):
                raise StaleOwnerError("run", run_id, fences[run_id])
        for run in runs:
            check_follows(run, self._runs[run.run_id].run.state)
        for event in events:
            if event.sequence in self._events[event.run_id]:
                raise ValueError(f"run {event.run_id} has an event {event.sequence} already")
        for run in runs:
            kept = self._runs[run.run_id]
            self._runs[run.run_id] = StoredRun(Run.FromString(run.SerializeToString()), kept.workflow, kept.limits)
        for event in events:
            self._events[event.run_id][event.sequence] = event.SerializeToString()

    async def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        stored = await self.get_stored(run_id, tenant=tenant)
        return stored.run if stored else None

    async def get_stored(self, run_id: str, *, tenant: str | None = None) -> StoredRun | None:
        stored = self._runs.get(run_id)
        if stored is None or tenant not in (None, stored.run.tenant_id):
            return None
        return StoredRun(Run.FromString(stored.run.SerializeToString()), stored.workflow, stored.limits)

    async def list_runs(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Run]:
        keyed = sorted(((s.run.create_time.ToNanoseconds(), run_id) for run_id, s in self._runs.items()), reverse=True)
        found = []
        for key in keyed:
            run = self._runs[key[1]].run
            if (after is None or key < after) and (not state or run.state == state) and tenant in (None, run.tenant_id):
                found.append(Run.FromString(run.SerializeToString()))
                if len(found) == limit:
                    break
        return found

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[StoredRun, Fence]]:
        now = time.time_ns()
        free = [
            kept
            for run_id, kept in self._runs.items()
            if kept.run.state in UNFINISHED
            and (
                (self._leases[run_id] < now and run_id not in driven)
                or (at_start and (self._fences[run_id].owner == owner or not self.shared))
            )
        ]
        free.sort(key=lambda kept: kept.run.create_time.ToNanoseconds())
        return [await self.claim(kept.run.run_id, owner, "claim") for kept in free[:limit]]

    async def renew(self, owner: str, run_ids: Collection[str]) -> set[str]:
        held = {run_id for run_id in run_ids if run_id in self._fences and self._fences[run_id].owner == owner}
        lease = lease_end(self.lease_seconds)
        self._leases.update({run_id: lease for run_id in held if self._runs[run_id].run.state in UNFINISHED})
        return held

    async def request_control(self, run_id: str, kind: str, reason: str) -> None:
        self._controls[run_id] = (kind, reason)

    async def take_controls(self, owner: str) -> list[tuple[str, str, str]]:
        taken = [run_id for run_id in self._controls if run_id in self._fences and self._fences[run_id].owner == owner]
        return [(run_id, *self._controls.pop(run_id)) for run_id in taken]

    async def events(self, run_id: str, *, after_sequence: int, limit: int | None = None) -> list[RunEvent]:
        stored = self._events.get(run_id, {})
        sequences = [sequence for sequence in sorted(stored) if sequence > after_sequence][:limit]
        return [RunEvent.FromString(stored[sequence]) for sequence in sequences]

    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        ended = sorted(
            (ended, run_id)
            for run_id, s in self._runs.items()
            if (ended := ended_ns(s.run)) is not None and ended < end_ns
        )
        return [run_id for _, run_id in ended[:limit]]

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        deleted = set(run_ids)
        for run_id in deleted:
            self._runs.pop(run_id, None)
            self._fences.pop(run_id, None)
            self._leases.pop(run_id, None)
            self._controls.pop(run_id, None)
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
# Numbered migrations from the first schema.
_MIGRATIONS = (
    # 1: the end time of finished runs (filled in below for those stored before), for retention.
    """
    ALTER TABLE runs ADD COLUMN end_ns INTEGER;
    CREATE INDEX IF NOT EXISTS runs_by_end ON runs (end_ns) WHERE end_ns IS NOT NULL;
    """,
    # 2: each run's owner and the epoch of its ownership, checked by every write.
    """
    ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: the end of the owner's lease (ns since the epoch), and requests for the owner of a run.
    """
    ALTER TABLE runs ADD COLUMN lease_ns INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS run_controls (
        run_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: the tenant each run belongs to (its request id is unique within the tenant: the column holds
    # it namespaced by the tenant), listed a tenant at a time.
    """
    ALTER TABLE runs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
    CREATE INDEX IF NOT EXISTS runs_by_tenant ON runs (tenant, create_ns DESC, run_id DESC);
    """,
    # 5: each tenant's unfinished runs, counted against its quota.
    """
    CREATE INDEX IF NOT EXISTS runs_unfinished_by_tenant ON runs (tenant) WHERE end_ns IS NULL;
    """,
)


# For each state, the states a run may be in for a write to leave it there, as a bit mask.
SOURCES = {
    target: sum(1 << source for source in RUN_LIFECYCLE.names if RUN_LIFECYCLE.follows(source, target))
    for target in RUN_LIFECYCLE.names
}


def unreadable_run(run_id: str) -> tuple[int, bytes, int]:
    """Returns the state, record and end time that replace a run whose record cannot be read."""
    run = Run(run_id=run_id, state=orchestrator_service_pb2.RUN_STATE_FAILED)
    run.error.CopyFrom(
        common_pb2.ErrorDetail(
            reason="RUN_NOT_RESUMABLE",
            message="the run cannot be resumed: its stored record cannot be read back",
            tier=common_pb2.TIER_ORCHESTRATE,
        )
    )
    run.end_time.GetCurrentTime()
    return run.state, run.SerializeToString(), run.end_time.ToNanoseconds()


def warn_unreadable(run_ids: Sequence[str]) -> None:
    if run_ids:
        _log.warning("%d stored runs cannot be read and are marked failed, such as %s", len(run_ids), run_ids[:5])


def _fenced(fences: Mapping[str, Fence], run_id: str) -> tuple[str, int]:
    fence = fences[run_id]
    return fence.owner, fence.epoch


def stored_run(row: Any) -> StoredRun:
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

    #: The store's file in the folder of the SQLite stores.
    FILE = "runs.sqlite3"

    @classmethod
    def in_folder(cls, folder: Path, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> SqliteRunStore:
        """Returns the store of its file in ``folder``."""
        return cls(folder / cls.FILE, lease_seconds=lease_seconds)

    def __init__(self, path: Path, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self._path = path
        self.lease_seconds = lease_seconds
        self._db: aiosqlite.Connection | None = None
        # One connection serves every caller: a compare-and-set (a read, then a write) must not
        # interleave with another caller's statements, so transactions take turns.
        self._turn = asyncio.Lock()

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the run store is not open")
        return self._db

    async def open(self) -> None:
        self._db, version = await sqlite.connect(self._path, _SCHEMA, _MIGRATIONS)
        if version < 1:
            await self._fill_end_times()

    async def _fill_end_times(self) -> None:
        marks = ", ".join("?" * len(FINISHED))
        async with self._conn.execute(f"SELECT run FROM runs WHERE state IN ({marks})", FINISHED) as rows:
            ended = [(ended_ns(run), run.run_id) for run in (Run.FromString(row[0]) for row in await rows.fetchall())]
        await self._conn.executemany("UPDATE runs SET end_ns = ? WHERE run_id = ?", ended)
        await self._conn.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def create_run(self, stored: StoredRun, owner: str, *, most: int = 0) -> tuple[Run, Fence | None]:
        run = stored.run
        async with self._turn:
            cursor = await self._conn.execute(
                "INSERT INTO runs"
                " (run_id, request_id, state, create_ns, run, workflow, limits, owner, epoch, lease_ns, tenant)"
                " SELECT ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?"
                " WHERE ? = 0 OR (SELECT count(*) FROM runs WHERE tenant = ? AND end_ns IS NULL) < ?"
                " ON CONFLICT (request_id) DO NOTHING",
                (
                    run.run_id,
                    request_key(run),
                    run.state,
                    run.create_time.ToNanoseconds(),
                    run.SerializeToString(),
                    stored.workflow.SerializeToString(),
                    stored.limits.SerializeToString(),
                    owner,
                    lease_end(self.lease_seconds),
                    run.tenant_id,
                    most,
                    run.tenant_id,
                    most,
                ),
            )
            await self._conn.commit()
            if cursor.rowcount == 1:
                return run, Fence(owner, 1)
            async with self._conn.execute("SELECT run FROM runs WHERE request_id = ?", (request_key(run),)) as rows:
                row = await rows.fetchone()
        if row is None:  # deletes wait for the writer too, so no request id conflicted: the quota refused it
            raise too_many_unfinished("runs", most)
        return Run.FromString(row[0]), None

    async def claim(self, run_id: str, owner: str, transition: str) -> tuple[StoredRun, Fence]:
        async with self._turn:
            query = "SELECT run, workflow, limits, epoch FROM runs WHERE run_id = ?"
            async with self._conn.execute(query, (run_id,)) as rows:
                row = await rows.fetchone()
            if row is None:
                raise NotFoundError("run", run_id)
            stored = stored_run(row[:3])
            stored.run.state = RUN_LIFECYCLE.next(run_id, stored.run.state, transition)  # type: ignore[assignment]
            fence = Fence(owner, row[3] + 1)
            await self._conn.execute(
                "UPDATE runs SET state = ?, run = ?, end_ns = ?, owner = ?, epoch = ?, lease_ns = ? WHERE run_id = ?",
                (
                    stored.run.state,
                    stored.run.SerializeToString(),
                    ended_ns(stored.run),
                    owner,
                    fence.epoch,
                    lease_end(self.lease_seconds),
                    run_id,
                ),
            )
            await self._conn.commit()
        return stored, fence

    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent], fences: Mapping[str, Fence]) -> None:
        recorded = {run.run_id for run in runs}
        others = {event.run_id for event in events} - recorded
        async with self._turn:
            try:
                before = self._conn.total_changes
                await self._conn.executemany(
                    "UPDATE runs SET state = ?, run = ?, end_ns = ?"
                    " WHERE run_id = ? AND owner = ? AND epoch = ? AND (? >> state) & 1 = 1",
                    [
                        (
                            run.state,
                            run.SerializeToString(),
                            ended_ns(run),
                            run.run_id,
                            *_fenced(fences, run.run_id),
                            SOURCES[run.state],
                        )
                        for run in runs
                    ],
                )
                # A run whose events alone are written: the same check, changing nothing.
                await self._conn.executemany(
                    "UPDATE runs SET epoch = epoch WHERE run_id = ? AND owner = ? AND epoch = ?",
                    [(run_id, *_fenced(fences, run_id)) for run_id in others],
                )
                if self._conn.total_changes - before != len(recorded) + len(others):
                    await self._refuse(runs, others, fences)
                await self._conn.executemany(
                    "INSERT INTO events (run_id, sequence, event) VALUES (?, ?, ?)",
                    [(event.run_id, event.sequence, event.SerializeToString()) for event in events],
                )
                await self._conn.commit()
            except BaseException:
                await self._conn.rollback()
                raise

    async def _refuse(self, runs: Sequence[Run], others: set[str], fences: Mapping[str, Fence]) -> None:
        """Finds the run a write may not change and raises why (the caller rolls back).

        Raises:
            StaleOwnerError: A fence is stale.
            IllegalTransitionError: A record's state cannot follow the stored one.
        """
        records = {run.run_id: run for run in runs}
        for run_id in [*records, *others]:
            async with self._conn.execute("SELECT owner, epoch, state FROM runs WHERE run_id = ?", (run_id,)) as rows:
                row = await rows.fetchone()
            if row is None or Fence(row[0], row[1]) != fences[run_id]:
                raise StaleOwnerError("run", run_id, fences[run_id])
            if run_id in records:
                check_follows(records[run_id], row[2])
        raise AssertionError("a write was refused for no reason found")

    async def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        async with self._conn.execute(
            "SELECT run FROM runs WHERE run_id = ? AND tenant = coalesce(?, tenant)", (run_id, tenant)
        ) as rows:
            row = await rows.fetchone()
        return Run.FromString(row[0]) if row else None

    async def get_stored(self, run_id: str, *, tenant: str | None = None) -> StoredRun | None:
        async with self._conn.execute(
            "SELECT run, workflow, limits FROM runs WHERE run_id = ? AND tenant = coalesce(?, tenant)", (run_id, tenant)
        ) as rows:
            row = await rows.fetchone()
        return stored_run(row) if row else None

    async def list_runs(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Run]:
        clauses: list[str] = []
        params: list[int | str] = []
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
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

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[StoredRun, Fence]]:
        marks = ", ".join("?" * len(UNFINISHED))
        query = (
            f"SELECT run_id, run, workflow, limits, epoch FROM runs WHERE state IN ({marks})"
            " AND ((lease_ns < ? AND run_id NOT IN (SELECT value FROM json_each(?))) OR ?) ORDER BY create_ns LIMIT ?"
        )
        async with self._turn:
            parameters = (
                *UNFINISHED,
                time.time_ns(),
                json.dumps(list(driven)),
                at_start,
                -1 if limit is None else limit,
            )
            async with self._conn.execute(query, parameters) as rows:
                found = await rows.fetchall()
            taken, unreadable = [], []
            for run_id, *row, epoch in found:
                try:
                    taken.append((stored_run(row), Fence(owner, epoch + 1)))
                except DecodeError:
                    unreadable.append(run_id)
            lease = lease_end(self.lease_seconds)
            await self._conn.executemany(
                "UPDATE runs SET owner = ?, epoch = ?, lease_ns = ? WHERE run_id = ?",
                [(owner, fence.epoch, lease, stored.run.run_id) for stored, fence in taken],
            )
            await self._conn.executemany(
                "UPDATE runs SET state = ?, run = ?, end_ns = ? WHERE run_id = ?",
                [(*unreadable_run(run_id), run_id) for run_id in unreadable],
            )
            await self._conn.commit()
        warn_unreadable(unreadable)
        return taken

    async def renew(self, owner: str, run_ids: Collection[str]) -> set[str]:
        marks = ", ".join("?" * len(UNFINISHED))
        # One statement for them all (the ids as a JSON array): a replica holding tens of thousands
        # renews them in one trip to the database, not one each.
        async with self._turn:
            async with self._conn.execute(
                f"UPDATE runs SET lease_ns = CASE WHEN state IN ({marks}) THEN ? ELSE lease_ns END"
                " WHERE run_id IN (SELECT value FROM json_each(?)) AND owner = ? RETURNING run_id",
                (*UNFINISHED, lease_end(self.lease_seconds), json.dumps(list(run_ids)), owner),
            ) as rows:
                held = {row[0] for row in await rows.fetchall()}
            await self._conn.commit()
        return held

    async def request_control(self, run_id: str, kind: str, reason: str) -> None:
        async with self._turn:
            await self._conn.execute(
                "INSERT INTO run_controls (run_id, kind, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id) DO UPDATE SET kind = excluded.kind, reason = excluded.reason",
                (run_id, kind, reason),
            )
            await self._conn.commit()

    async def take_controls(self, owner: str) -> list[tuple[str, str, str]]:
        async with self._turn:
            async with self._conn.execute(
                "DELETE FROM run_controls WHERE run_id IN (SELECT run_id FROM runs WHERE owner = ?)"
                " RETURNING run_id, kind, reason",
                (owner,),
            ) as rows:
                taken = [(str(run_id), str(kind), str(reason)) for run_id, kind, reason in await rows.fetchall()]
            await self._conn.commit()
        return taken

    async def events(self, run_id: str, *, after_sequence: int, limit: int | None = None) -> list[RunEvent]:
        async with self._conn.execute(
            "SELECT event FROM events WHERE run_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (run_id, after_sequence, -1 if limit is None else limit),
        ) as rows:
            return [RunEvent.FromString(row[0]) for row in await rows.fetchall()]

    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        async with self._conn.execute(
            "SELECT run_id FROM runs WHERE end_ns IS NOT NULL AND end_ns < ? ORDER BY end_ns LIMIT ?", (end_ns, limit)
        ) as rows:
            return [row[0] for row in await rows.fetchall()]

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        parameters = [(run_id,) for run_id in run_ids]
        async with self._turn:
            await self._conn.executemany("DELETE FROM run_controls WHERE run_id = ?", parameters)
            await self._conn.executemany("DELETE FROM events WHERE run_id = ?", parameters)
            await self._conn.executemany("DELETE FROM runs WHERE run_id = ?", parameters)
            await self._conn.commit()
