"""What Execute keeps across its own restarts: the executions it finished (by execution id, so that
a step asked for again is replayed, not run again) and the approvals that wait for an answer. One
interface, with an in-memory backend and SQLite (aiosqlite, WAL) behind it."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiosqlite

from tierstack.core.lifecycle import DEFAULT_LEASE_SECONDS
from tierstack.server import sqlite
from tierstack.v1 import executor_service_pb2

ExecutionEvent = executor_service_pb2.ExecutionEvent


@dataclass(frozen=True, slots=True)
class Approval:
    """A tool call of an execution that waits for a person.

    Attributes:
        approval_id: What ApproveToolCall and RejectToolCall name.
        execution_id: The execution the call belongs to.
        index: The call's position in its step; with the execution id it names the call, so an
            execution run again after a restart finds the approval it opened before.
        tool: The tool the call runs.
        arguments: The call's arguments, a serialised ``google.protobuf.Struct``.
        expire_ns: When the call is rejected if nobody answers, in ns since the epoch.
        decided: Whether someone answered.
        rejection: Why the call was rejected; empty when it was approved.
    """

    approval_id: str
    execution_id: str
    index: int
    tool: str
    arguments: bytes
    expire_ns: int
    decided: bool = False
    rejection: str = ""


def stop_key(execution_id: str) -> str:
    """Returns the key that :meth:`ExecutionStore.wait_changed` names when replicas are asked to stop
    an execution (its id alone names its end)."""
    return f"{execution_id}:stop"


def pack_events(events: Sequence[ExecutionEvent]) -> bytes:
    """Frames events as (4-byte length, message) pairs."""
    return b"".join(len(data).to_bytes(4, "big") + data for data in (e.SerializeToString() for e in events))


def unpack_events(blob: bytes) -> list[ExecutionEvent]:
    """Returns the events of a stored execution, from their framed form."""
    events, position = [], 0
    while position < len(blob):
        size = int.from_bytes(blob[position : position + 4], "big")
        events.append(ExecutionEvent.FromString(blob[position + 4 : position + 4 + size]))
        position += 4 + size
    return events


#: How many bytes of finished executions' events a store keeps unless told otherwise.
DEFAULT_MAX_BYTES = 1 << 30


class ExecutionStore(abc.ABC):
    """Keeps finished executions and waiting approvals. The finished executions are bounded in bytes:
    past the budget, those finished longest ago are forgotten (asked for again, they run again).

    A store that several Execute replicas share also knows which replica runs an execution now
    (``begin``, under a lease its runner keeps with ``hold``), so that one asked for on two replicas
    runs on one; a store of one process leaves that to the process, and these methods do nothing.

    Attributes:
        shared: Whether several processes may use the store at once.
        lease_seconds: How long a replica holds an execution it runs without renewing.
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
    async def finished(self, execution_id: str) -> list[ExecutionEvent] | None:
        """Returns the events of a finished execution, or None when it has not finished."""

    @abc.abstractmethod
    async def finish(self, execution_id: str, events: Sequence[ExecutionEvent]) -> None:
        """Keeps a finished execution's events (the first one kept for an id stays), forgetting
        those finished longest ago while the events kept are over the byte budget."""

    @abc.abstractmethod
    async def open_approval(self, approval: Approval) -> Approval:
        """Keeps a new approval and returns it, or returns the one already open for the same
        execution and call."""

    @abc.abstractmethod
    async def approval(self, approval_id: str) -> Approval | None:
        """Returns an approval, or None."""

    @abc.abstractmethod
    async def decide(self, approval_id: str, rejection: str | None) -> Approval | None:
        """Answers a waiting approval (None approves, else why it is rejected) and returns it as
        answered; returns None when no approval by that id waits (never opened, or answered)."""

    async def begin(self, execution_id: str, owner: str) -> bool:
        """Claims an execution for ``owner`` to run; False when another replica runs it now, or it has
        finished (its end is then for :meth:`finished`)."""
        return True

    async def hold(self, execution_ids: Collection[str], owner: str) -> None:  # noqa: B027 (one process: nothing)
        """Renews ``owner``'s claims of the executions it runs."""

    async def release(self, execution_id: str, owner: str) -> None:  # noqa: B027 (one process: nothing)
        """Gives up ``owner``'s claim of an execution that stopped without an end (it runs again
        when asked for)."""

    async def wait_changed(self, key: str, timeout: float) -> None:
        """Returns once ``key`` may have changed on another replica (an execution, named by its id,
        finished; one named by :func:`stop_key` was asked to stop; an approval was answered), or
        after ``timeout``."""
        await asyncio.sleep(timeout)

    async def request_cancel(self, execution_id: str) -> bool:
        """Asks every replica that runs or follows an execution to stop it (each learns it from
        :meth:`cancels`, its runner woken by :func:`stop_key`, its followers as they look again);
        returns whether a replica runs it now. A store of one process leaves
        that to the process: it records nothing and returns False."""
        return False

    async def cancels(self, execution_id: str) -> int:
        """Returns how many times replicas were asked to stop an execution since it was last claimed
        (:meth:`begin` starts it afresh)."""
        return 0

    @abc.abstractmethod
    async def forget_before(self, ns: int) -> int:
        """Forgets the executions finished, the approvals expired and the requests to stop executions
        made before ``ns`` (ns since the epoch); returns how many executions were forgotten."""


class MemoryExecutionStore(ExecutionStore):
    """Keeps executions in this process only; for tests and throwaway servers.

    Args:
        max_bytes: The most bytes of finished executions' events kept.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._finished: dict[str, tuple[int, bytes]] = {}  # in the order they finished
        self._approvals: dict[str, Approval] = {}

    async def open(self) -> None:
        """Nothing to prepare."""

    async def close(self) -> None:
        """Nothing to release."""

    async def finished(self, execution_id: str) -> list[ExecutionEvent] | None:
        found = self._finished.get(execution_id)
        return None if found is None else unpack_events(found[1])

    async def finish(self, execution_id: str, events: Sequence[ExecutionEvent]) -> None:
        if execution_id in self._finished:
            return
        packed = self._finished[execution_id] = (time.time_ns(), pack_events(events))
        self._bytes += len(packed[1])
        while self._bytes > self._max_bytes:
            oldest = next(iter(self._finished))
            self._bytes -= len(self._finished.pop(oldest)[1])

    async def open_approval(self, approval: Approval) -> Approval:
        for kept in self._approvals.values():
            if (kept.execution_id, kept.index) == (approval.execution_id, approval.index):
                return kept
        self._approvals[approval.approval_id] = approval
        return approval

    async def approval(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    async def decide(self, approval_id: str, rejection: str | None) -> Approval | None:
        kept = self._approvals.get(approval_id)
        if kept is None or kept.decided:
            return None
        answered = self._approvals[approval_id] = replace(kept, decided=True, rejection=rejection or "")
        return answered

    async def forget_before(self, ns: int) -> int:
        old = [key for key, (finish_ns, _) in self._finished.items() if finish_ns < ns]
        for key in old:
            self._bytes -= len(self._finished.pop(key)[1])
        for key in [key for key, approval in self._approvals.items() if approval.expire_ns < ns]:
            del self._approvals[key]
        return len(old)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    execution_id TEXT PRIMARY KEY,
    finish_ns INTEGER NOT NULL,
    events BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS executions_by_finish ON executions (finish_ns);
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    execution_id TEXT NOT NULL,
    call_index INTEGER NOT NULL,
    tool TEXT NOT NULL,
    arguments BLOB NOT NULL,
    expire_ns INTEGER NOT NULL,
    decided INTEGER NOT NULL DEFAULT 0,
    rejection TEXT NOT NULL DEFAULT '',
    UNIQUE (execution_id, call_index)
);
"""
APPROVAL_COLUMNS = "approval_id, execution_id, call_index, tool, arguments, expire_ns, decided, rejection"


def approval_of_row(row: aiosqlite.Row | tuple[object, ...]) -> Approval:
    approval_id, execution_id, index, tool, arguments, expire_ns, decided, rejection = row
    return Approval(
        approval_id=str(approval_id),
        execution_id=str(execution_id),
        index=int(str(index)),
        tool=str(tool),
        arguments=bytes(arguments),  # type: ignore[arg-type]
        expire_ns=int(str(expire_ns)),
        decided=bool(decided),
        rejection=str(rejection),
    )


class SqliteExecutionStore(ExecutionStore):
    """Keeps executions in one SQLite file (WAL, synchronous=NORMAL), off the event loop.

    Args:
        path: The database file; its folder is created when missing.
        max_bytes: The most bytes of finished executions' events kept.
    """

    #: The store's file in the folder of the SQLite stores.
    FILE = "executions.sqlite3"

    @classmethod
    def in_folder(cls, folder: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> SqliteExecutionStore:
        """Returns the store of its file in ``folder``."""
        return cls(folder / cls.FILE, max_bytes=max_bytes)

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._bytes = 0
        self._db: aiosqlite.Connection | None = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the execution store is not open")
        return self._db

    async def open(self) -> None:
        self._db, _ = await sqlite.connect(self._path, _SCHEMA)
        self._bytes = await self._kept_bytes()

    async def _kept_bytes(self) -> int:
        async with self._conn.execute("SELECT COALESCE(SUM(LENGTH(events)), 0) FROM executions") as rows:
            row = await rows.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def finished(self, execution_id: str) -> list[ExecutionEvent] | None:
        async with self._conn.execute("SELECT events FROM executions WHERE execution_id = ?", (execution_id,)) as rows:
            row = await rows.fetchone()
        return None if row is None else unpack_events(row[0])

    async def finish(self, execution_id: str, events: Sequence[ExecutionEvent]) -> None:
        packed = pack_events(events)
        cursor = await self._conn.execute(
            "INSERT INTO executions (execution_id, finish_ns, events) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (execution_id, time.time_ns(), packed),
        )
        self._bytes += len(packed) if cursor.rowcount == 1 else 0
        while self._bytes > self._max_bytes:
            query = "SELECT execution_id, LENGTH(events) FROM executions ORDER BY finish_ns LIMIT 64"
            async with self._conn.execute(query) as rows:
                oldest = await rows.fetchall()
            if not oldest:
                break
            for forgotten, size in oldest:
                if self._bytes <= self._max_bytes:
                    break
                await self._conn.execute("DELETE FROM executions WHERE execution_id = ?", (forgotten,))
                self._bytes -= size
        await self._conn.commit()

    async def open_approval(self, approval: Approval) -> Approval:
        await self._conn.execute(
            f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 0, '') ON CONFLICT DO NOTHING",
            (
                approval.approval_id,
                approval.execution_id,
                approval.index,
                approval.tool,
                approval.arguments,
                approval.expire_ns,
            ),
        )
        await self._conn.commit()
        query = f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE execution_id = ? AND call_index = ?"
        async with self._conn.execute(query, (approval.execution_id, approval.index)) as rows:
            row = await rows.fetchone()
        assert row is not None  # just written, or kept from before
        return approval_of_row(row)

    async def approval(self, approval_id: str) -> Approval | None:
        query = f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE approval_id = ?"
        async with self._conn.execute(query, (approval_id,)) as rows:
            row = await rows.fetchone()
        return None if row is None else approval_of_row(row)

    async def decide(self, approval_id: str, rejection: str | None) -> Approval | None:
        cursor = await self._conn.execute(
            "UPDATE approvals SET decided = 1, rejection = ? WHERE approval_id = ? AND decided = 0",
            (rejection or "", approval_id),
        )
        await self._conn.commit()
        return await self.approval(approval_id) if cursor.rowcount == 1 else None

    async def forget_before(self, ns: int) -> int:
        cursor = await self._conn.execute("DELETE FROM executions WHERE finish_ns < ?", (ns,))
        await self._conn.execute("DELETE FROM approvals WHERE expire_ns < ?", (ns,))
        await self._conn.commit()
        self._bytes = await self._kept_bytes()
        return cursor.rowcount
