"""Goal storage: one interface, with an in-memory backend and SQLite (aiosqlite, WAL) behind it.

Every write names the writer's :class:`~tierstack.core.lifecycle.Fence` and the state it believes
the goal is in; the store checks both in the same write that appends events and applies a
transition (from :data:`~tierstack.core.lifecycle.GOAL_LIFECYCLE`), and numbers the events itself,
after the goal's last stored sequence. So a goal has one writer at a time, its history has no gaps
and no two events share a number, and a stale writer is told so instead of being ignored.

An owner holds its goals under a lease that it renews; a goal whose lease has passed is taken over
by another owner, as runs are (see ``tierstack.server.orchestrate.store``), and a request to cancel a
goal waits in the store for its owner.

The store also holds the goal memory (see ``tierstack.server.coordinate.memory``), so that the
replicas sharing a store learn from each other's goals.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from google.protobuf.message import DecodeError

from tierstack.core.errors import NotFoundError
from tierstack.core.lifecycle import (
    DEFAULT_LEASE_SECONDS,
    GOAL_LIFECYCLE,
    Fence,
    IllegalTransitionError,
    StaleOwnerError,
    lease_end,
)
from tierstack.server import sqlite
from tierstack.server.auth.principal import namespaced
from tierstack.server.auth.quota import too_many_unfinished
from tierstack.v1 import coordinator_service_pb2 as pb

Goal = pb.Goal
GoalEvent = pb.GoalEvent
_log = logging.getLogger(__name__)
UNFINISHED = (pb.GOAL_STATE_PENDING, pb.GOAL_STATE_RUNNING)
#: The same, as an SQL list.
UNFINISHED_SQL = f"({', '.join(str(state) for state in UNFINISHED)})"


@dataclass(frozen=True, slots=True)
class Written:
    """What one write stored: the writer's goal in the state and at the last sequence it is now
    stored at, and the events as numbered."""

    goal: Goal
    events: list[GoalEvent]


@dataclass(frozen=True, slots=True)
class Learnt:
    """A goal's decomposition, as the goal memory keeps it.

    Attributes:
        position: Its place in the order decompositions were learnt (a goal learnt again moves last).
        goal: The goal's text.
        subtasks: The goal's subtasks.
    """

    position: int
    goal: str
    subtasks: list[pb.Subtask]


def memory_key(goal: str) -> bytes:
    """Returns the key a goal's decomposition is stored under: a digest, so that keys stay small
    however long goals are."""
    return hashlib.sha256(goal.encode()).digest()


def tenant_of(goal: Goal) -> str:
    """Returns the tenant a goal belongs to: the one its request was made for."""
    return goal.request.context.tenant_id


def request_key(goal: Goal) -> str | None:
    """Returns what makes a goal's request id unique: the id within the goal's tenant (None without one)."""
    request_id = goal.request.request_id
    return namespaced(tenant_of(goal), request_id) if request_id else None


def pack_subtasks(subtasks: Sequence[pb.Subtask]) -> bytes:
    return pb.GoalDecomposed(subtasks=subtasks).SerializeToString()


def learnt_rows(rows: Sequence[tuple[Any, Any, Any]]) -> list[Learnt]:
    """Returns the decompositions of stored rows (position, goal, packed subtasks), leaving out with a
    warning those that cannot be read."""
    learnt, unreadable = [], 0
    for position, goal, packed in rows:
        try:
            learnt.append(Learnt(int(position), str(goal), list(pb.GoalDecomposed.FromString(packed).subtasks)))
        except DecodeError:
            unreadable += 1
    if unreadable:
        _log.warning("goal memory: %d stored decompositions cannot be read and are left out", unreadable)
    return learnt


class GoalStore(abc.ABC):
    """Keeps goals, their owners and their events, and the goal memory (the decompositions learnt).
    Messages are stored in their protobuf wire form.

    Attributes:
        shared: Whether several processes may use the store at once.
        lease_seconds: How long a claim holds a goal without being renewed.
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
    async def create_goal(self, goal: Goal, owner: str, *, most: int = 0) -> tuple[Goal, Fence | None]:
        """Stores a new goal (pending, with no events) owned by ``owner`` at epoch 1, and returns it
        with its fence; when its ``request.request_id`` is already taken in its tenant, stores nothing
        and returns the goal that holds it, without a fence.

        Args:
            most: The most unfinished goals the goal's tenant may have with this one, checked in the
                same transaction as the insert; 0 for no limit.

        Raises:
            ResourceExhaustedError: The tenant has ``most`` unfinished goals already.
        """

    @abc.abstractmethod
    async def claim(self, goal_id: str, owner: str) -> Fence:
        """Makes ``owner`` the owner of an unfinished goal at the next epoch, so that every write
        under an earlier fence is refused from now on, and returns the new fence.

        Raises:
            NotFoundError: No goal has that id.
            IllegalTransitionError: The goal has ended.
        """

    @abc.abstractmethod
    async def write(
        self, goal: Goal, fence: Fence, events: Sequence[GoalEvent], *, transition: str | None = None
    ) -> Written:
        """Appends ``events``, numbered from the goal's last stored sequence, and with a
        ``transition`` replaces the goal's record by ``goal`` in the state the lifecycle gives; all
        in one compare-and-set on the owner and epoch of ``fence`` and the state ``goal.state``.

        Raises:
            StaleOwnerError: Another owner claimed the goal since ``fence`` was issued.
            IllegalTransitionError: The goal is not in ``goal.state``, or the lifecycle has no such
                transition from it.
            NotFoundError: No goal has that id.
        """

    @abc.abstractmethod
    async def get_goal(self, goal_id: str, *, tenant: str | None = None) -> Goal | None:
        """Returns a goal (of ``tenant`` only, unless it is None), or None."""

    @abc.abstractmethod
    async def list_goals(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Goal]:
        """Returns up to ``limit`` goals, newest first, older than the (create time in ns, goal id)
        cursor ``after``, keeping only ``state`` unless it is 0, and only ``tenant``'s unless it is
        None."""

    @abc.abstractmethod
    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[Goal, Fence]]:
        """Claims for ``owner`` (with a new lease) up to ``limit`` (None: all) pending or running goals
        that no live owner holds, oldest first, and returns them with their fences: those whose lease
        has passed, but for the goals ``owner`` drives (``driven``: a lease it renewed late is no reason
        to take them from itself), and, ``at_start``, those held under ``owner``'s own name or, on a
        store that is not shared, every one. A goal whose stored record cannot be read is failed
        instead."""

    @abc.abstractmethod
    async def renew(self, owner: str, goal_ids: Collection[str]) -> set[str]:
        """Extends the lease of those of ``goal_ids`` that ``owner`` holds and that are pending or
        running, and returns every one of them that ``owner`` still holds, whatever its state."""

    @abc.abstractmethod
    async def request_cancel(self, goal_id: str, reason: str) -> None:
        """Leaves a request to cancel a goal (and why) for its owner; nothing for an unknown goal."""

    @abc.abstractmethod
    async def take_cancels(self, owner: str) -> list[tuple[str, str]]:
        """Removes and returns the requests left for the goals ``owner`` holds, as (goal id, reason)."""

    async def wait_changed(self, key: str, timeout: float) -> None:
        """Returns once the goal ``key`` (or, as ``owner:<name>``, the requests for an owner) may have
        changed, or after ``timeout`` seconds; a store that can tell (PostgreSQL) returns early."""
        await asyncio.sleep(timeout)

    @abc.abstractmethod
    async def events(self, goal_id: str, *, after_sequence: int) -> list[GoalEvent]:
        """Returns a goal's events with a sequence number above ``after_sequence``, in order."""

    @abc.abstractmethod
    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask], *, keep: int) -> None:
        """Keeps a goal's decomposition in the goal memory, in place of the goal's earlier one, and
        forgets those learnt longest ago beyond the newest ``keep``. Replicas learn one at a time, so
        positions are given in the order the decompositions are stored."""

    @abc.abstractmethod
    async def learnt(self, *, after: int, limit: int) -> list[Learnt]:
        """Returns up to ``limit`` decompositions of the goal memory learnt after position ``after``,
        in the order learnt; one stored unreadably is left out with a warning."""


def warn_unreadable(goal_ids: Sequence[str]) -> None:
    if goal_ids:
        _log.warning("%d stored goals cannot be read and are marked failed: %s", len(goal_ids), goal_ids[:5])


def _copy(goal: Goal) -> Goal:
    return Goal.FromString(goal.SerializeToString())


def next_state(goal: Goal, stored_state: int, transition: str | None) -> pb.GoalState.ValueType:
    """Returns the state a write leaves the goal in, checking the state the writer expects."""
    if goal.state != stored_state:
        name = GOAL_LIFECYCLE.names.get(stored_state, str(stored_state))
        raise IllegalTransitionError(
            f"goal {goal.goal_id} is {name}, not {GOAL_LIFECYCLE.names.get(goal.state, goal.state)} as the writer"
            " expects; the write is refused",
            metadata={"goal_id": goal.goal_id, "state": name},
        )
    following = stored_state if transition is None else GOAL_LIFECYCLE.next(goal.goal_id, stored_state, transition)
    return pb.GoalState.ValueType(following)


def number_events(goal_id: str, events: Sequence[GoalEvent], after: int) -> list[GoalEvent]:
    numbered = []
    for offset, event in enumerate(events, start=1):
        copy = GoalEvent()
        copy.CopyFrom(event)
        copy.goal_id, copy.sequence = goal_id, after + offset
        numbered.append(copy)
    return numbered


def written(goal: Goal, state: pb.GoalState.ValueType, after: int, numbered: list[GoalEvent]) -> Written:
    held = _copy(goal)
    held.state, held.last_sequence = state, after + len(numbered)
    return Written(held, numbered)


@dataclass(slots=True)
class _Held:
    goal: Goal
    fence: Fence
    events: list[bytes]
    lease_ns: int
    cancel: str | None = None


def new_row(goal: Goal, owner: str) -> tuple[str, str | None, int, int, str, bytes]:
    """Returns the first columns of a new goal's row: its id, request key, state, creation, owner and record."""
    return (
        goal.goal_id,
        request_key(goal),
        goal.state,
        goal.create_time.ToNanoseconds(),
        owner,
        goal.SerializeToString(),
    )


class MemoryGoalStore(GoalStore):
    """Keeps goals in this process only; for tests and throwaway goals."""

    def __init__(self, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.lease_seconds = lease_seconds
        self._goals: dict[str, _Held] = {}
        self._by_request: dict[str, str] = {}
        self._learnt: dict[str, tuple[int, bytes]] = {}  # by goal, in the order learnt
        self._position = 0

    async def open(self) -> None:
        """Nothing to prepare."""

    async def close(self) -> None:
        """Nothing to release."""

    async def create_goal(self, goal: Goal, owner: str, *, most: int = 0) -> tuple[Goal, Fence | None]:
        request_id = request_key(goal)
        if request_id and request_id in self._by_request:
            return _copy(self._goals[self._by_request[request_id]].goal), None
        tenant = tenant_of(goal)
        if (
            most
            and sum(tenant_of(h.goal) == tenant and h.goal.state in UNFINISHED for h in self._goals.values()) >= most
        ):
            raise too_many_unfinished("goals", most)
        fence = Fence(owner, 1)
        self._goals[goal.goal_id] = _Held(_copy(goal), fence, [], lease_end(self.lease_seconds))
        if request_id:
            self._by_request[request_id] = goal.goal_id
        return _copy(goal), fence

    def _held(self, goal_id: str) -> _Held:
        held = self._goals.get(goal_id)
        if held is None:
            raise NotFoundError("goal", goal_id)
        return held

    async def claim(self, goal_id: str, owner: str) -> Fence:
        held = self._held(goal_id)
        GOAL_LIFECYCLE.next(goal_id, held.goal.state, "claim")
        held.fence = Fence(owner, held.fence.epoch + 1)
        held.lease_ns = lease_end(self.lease_seconds)
        return held.fence

    async def write(
        self, goal: Goal, fence: Fence, events: Sequence[GoalEvent], *, transition: str | None = None
    ) -> Written:
        held = self._held(goal.goal_id)
        if held.fence != fence:
            raise StaleOwnerError("goal", goal.goal_id, fence)
        state = next_state(goal, held.goal.state, transition)
        last_sequence = held.goal.last_sequence
        numbered = number_events(goal.goal_id, events, last_sequence)
        if transition is not None:
            held.goal = _copy(goal)
        held.goal.state, held.goal.last_sequence = state, last_sequence + len(numbered)
        held.events.extend(event.SerializeToString() for event in numbered)
        return written(goal, state, last_sequence, numbered)

    async def get_goal(self, goal_id: str, *, tenant: str | None = None) -> Goal | None:
        held = self._goals.get(goal_id)
        return _copy(held.goal) if held and tenant in (None, tenant_of(held.goal)) else None

    async def list_goals(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Goal]:
        keyed = sorted(
            ((h.goal.create_time.ToNanoseconds(), goal_id) for goal_id, h in self._goals.items()), reverse=True
        )
        found = []
        for key in keyed:
            goal = self._goals[key[1]].goal
            if (
                (after is None or key < after)
                and (not state or goal.state == state)
                and tenant in (None, tenant_of(goal))
            ):
                found.append(_copy(goal))
                if len(found) == limit:
                    break
        return found

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[Goal, Fence]]:
        now = time.time_ns()
        free = [
            held
            for held in self._goals.values()
            if held.goal.state in UNFINISHED
            and (
                (held.lease_ns < now and held.goal.goal_id not in driven)
                or (at_start and (held.fence.owner == owner or not self.shared))
            )
        ]
        free.sort(key=lambda held: held.goal.create_time.ToNanoseconds())
        return [(_copy(held.goal), await self.claim(held.goal.goal_id, owner)) for held in free[:limit]]

    async def renew(self, owner: str, goal_ids: Collection[str]) -> set[str]:
        held = {goal_id for goal_id in goal_ids if goal_id in self._goals and self._goals[goal_id].fence.owner == owner}
        for goal_id in held:
            if self._goals[goal_id].goal.state in UNFINISHED:
                self._goals[goal_id].lease_ns = lease_end(self.lease_seconds)
        return held

    async def request_cancel(self, goal_id: str, reason: str) -> None:
        if goal_id in self._goals:
            self._goals[goal_id].cancel = reason

    async def take_cancels(self, owner: str) -> list[tuple[str, str]]:
        taken = []
        for goal_id, held in self._goals.items():
            if held.fence.owner == owner and held.cancel is not None:
                taken.append((goal_id, held.cancel))
                held.cancel = None
        return taken

    async def events(self, goal_id: str, *, after_sequence: int) -> list[GoalEvent]:
        held = self._goals.get(goal_id)
        stored = held.events[after_sequence:] if held else []
        return [GoalEvent.FromString(event) for event in stored]

    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask], *, keep: int) -> None:
        self._learnt.pop(goal, None)
        self._position += 1
        self._learnt[goal] = (self._position, pack_subtasks(subtasks))
        while len(self._learnt) > keep:
            del self._learnt[next(iter(self._learnt))]

    async def learnt(self, *, after: int, limit: int) -> list[Learnt]:
        rows = [(position, goal, packed) for goal, (position, packed) in self._learnt.items() if position > after]
        return learnt_rows(rows[:limit])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS goals (
    goal_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    create_ns INTEGER NOT NULL,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    goal BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS goals_by_time ON goals (create_ns DESC, goal_id DESC);
CREATE TABLE IF NOT EXISTS goal_events (
    goal_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (goal_id, sequence)
) WITHOUT ROWID;
"""
# Numbered migrations from the first schema.
_MIGRATIONS = (
    # 1: the end of the owner's lease (ns since the epoch), and requests to cancel a goal.
    """
    ALTER TABLE goals ADD COLUMN lease_ns INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS goal_cancels (goal_id TEXT PRIMARY KEY, reason TEXT NOT NULL) WITHOUT ROWID;
    """,
    # 2: the goal memory: each goal's decomposition, by a digest of the goal, in the order learnt.
    """
    CREATE TABLE IF NOT EXISTS goal_memory (
        goal_key BLOB PRIMARY KEY,
        position INTEGER NOT NULL UNIQUE,
        goal TEXT NOT NULL,
        subtasks BLOB NOT NULL
    );
    """,
    # 3: the tenant each goal belongs to (its request id is unique within the tenant: the column
    # holds it namespaced by the tenant), listed a tenant at a time.
    """
    ALTER TABLE goals ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
    CREATE INDEX IF NOT EXISTS goals_by_tenant ON goals (tenant, create_ns DESC, goal_id DESC);
    """,
    # 4: each tenant's unfinished goals, counted against its quota.
    """
    CREATE INDEX IF NOT EXISTS goals_unfinished_by_tenant ON goals (tenant) WHERE state IN (1, 2);
    """,
)
_COLUMNS = "goal, state, last_sequence"


def stored_goal(row: Any) -> Goal:
    """Returns a stored goal: its record, with the state and last sequence of their own columns."""
    record, state, last_sequence = row
    goal = Goal.FromString(record)
    goal.state, goal.last_sequence = state, last_sequence
    return goal


class SqliteGoalStore(GoalStore):
    """Stores goals in one SQLite file (WAL, synchronous=NORMAL), off the event loop via aiosqlite.

    The state, owner, epoch and last sequence are columns of their own, so that a write checks and
    changes them in one ``UPDATE … WHERE``, as any SQL database can.

    Args:
        path: The database file; its folder is created when missing.
    """

    #: The store's file in the folder of the SQLite stores.
    FILE = "goals.sqlite3"

    @classmethod
    def in_folder(cls, folder: Path, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> SqliteGoalStore:
        """Returns the store of its file in ``folder``."""
        return cls(folder / cls.FILE, lease_seconds=lease_seconds)

    def __init__(self, path: Path, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self._path = path
        self.lease_seconds = lease_seconds
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the goal store is not open")
        return self._db

    async def open(self) -> None:
        self._db, _ = await sqlite.connect(self._path, _SCHEMA, _MIGRATIONS)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _one(self, query: str, params: tuple[str | int | None, ...]) -> Goal | None:
        async with self._conn.execute(f"SELECT {_COLUMNS} FROM goals WHERE {query}", params) as rows:
            row = await rows.fetchone()
        return stored_goal(row) if row else None

    async def create_goal(self, goal: Goal, owner: str, *, most: int = 0) -> tuple[Goal, Fence | None]:
        async with self._lock:
            cursor = await self._conn.execute(
                "INSERT INTO goals"
                " (goal_id, request_id, state, create_ns, owner, epoch, last_sequence, goal, lease_ns, tenant)"
                " SELECT ?, ?, ?, ?, ?, 1, 0, ?, ?, ?"
                f" WHERE ? = 0 OR (SELECT count(*) FROM goals WHERE tenant = ? AND state IN {UNFINISHED_SQL}) < ?"
                " ON CONFLICT (request_id) DO NOTHING",
                (*new_row(goal, owner), lease_end(self.lease_seconds), tenant_of(goal), most, tenant_of(goal), most),
            )
            await self._conn.commit()
            if cursor.rowcount == 1:
                return goal, Fence(owner, 1)
            held = await self._one("request_id = ?", (request_key(goal),))
        if held is None:  # no request id conflicts (goals are never deleted): the quota refused it
            raise too_many_unfinished("goals", most)
        return held, None

    async def claim(self, goal_id: str, owner: str) -> Fence:
        async with self._lock:
            goal = await self._one("goal_id = ?", (goal_id,))
            if goal is None:
                raise NotFoundError("goal", goal_id)
            GOAL_LIFECYCLE.next(goal_id, goal.state, "claim")
            async with self._conn.execute(
                "UPDATE goals SET owner = ?, epoch = epoch + 1, lease_ns = ? WHERE goal_id = ? AND state = ?"
                " RETURNING epoch",
                (owner, lease_end(self.lease_seconds), goal_id, goal.state),
            ) as rows:
                row = await rows.fetchone()
            await self._conn.commit()
        if row is None:  # it ended between the read and the update: claim it again to say so
            return await self.claim(goal_id, owner)
        return Fence(owner, int(row[0]))

    async def write(
        self, goal: Goal, fence: Fence, events: Sequence[GoalEvent], *, transition: str | None = None
    ) -> Written:
        async with self._lock:
            async with self._conn.execute(
                "SELECT state, owner, epoch, last_sequence FROM goals WHERE goal_id = ?", (goal.goal_id,)
            ) as rows:
                row = await rows.fetchone()
            if row is None:
                raise NotFoundError("goal", goal.goal_id)
            stored_state, owner, epoch, last_sequence = row
            if Fence(owner, epoch) != fence:
                raise StaleOwnerError("goal", goal.goal_id, fence)
            state = next_state(goal, stored_state, transition)
            numbered = number_events(goal.goal_id, events, last_sequence)
            record = (goal.SerializeToString(),) if transition is not None else ()
            # The compare-and-set: what was read above is checked again in the write itself.
            try:
                cursor = await self._conn.execute(
                    f"UPDATE goals SET state = ?, last_sequence = ?{', goal = ?' if record else ''}"
                    " WHERE goal_id = ? AND owner = ? AND epoch = ? AND state = ? AND last_sequence = ?",
                    (
                        state,
                        last_sequence + len(numbered),
                        *record,
                        goal.goal_id,
                        fence.owner,
                        fence.epoch,
                        stored_state,
                        last_sequence,
                    ),
                )
                if cursor.rowcount != 1:
                    raise StaleOwnerError("goal", goal.goal_id, fence)
                await self._conn.executemany(
                    "INSERT INTO goal_events (goal_id, sequence, event) VALUES (?, ?, ?)",
                    [(goal.goal_id, event.sequence, event.SerializeToString()) for event in numbered],
                )
                await self._conn.commit()
            except BaseException:
                await self._conn.rollback()  # all or nothing: no later commit may carry half of this one
                raise
        return written(goal, state, last_sequence, numbered)

    async def get_goal(self, goal_id: str, *, tenant: str | None = None) -> Goal | None:
        async with self._lock:
            return await self._one("goal_id = ? AND tenant = coalesce(?, tenant)", (goal_id, tenant))

    async def list_goals(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Goal]:
        clauses: list[str] = []
        params: list[int | str] = []
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        if after is not None:
            clauses.append("(create_ns, goal_id) < (?, ?)")
            params.extend(after)
        if state:
            clauses.append("state = ?")
            params.append(state)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = f"SELECT {_COLUMNS} FROM goals {where} ORDER BY create_ns DESC, goal_id DESC LIMIT ?"
        async with self._lock, self._conn.execute(query, (*params, limit)) as rows:
            return [stored_goal(row) for row in await rows.fetchall()]

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[Goal, Fence]]:
        marks = ", ".join("?" * len(UNFINISHED))
        query = (
            f"SELECT goal_id, epoch, {_COLUMNS} FROM goals WHERE state IN ({marks})"
            " AND ((lease_ns < ? AND goal_id NOT IN (SELECT value FROM json_each(?))) OR ?)"
            " ORDER BY create_ns LIMIT ?"
        )
        async with self._lock:
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
            for goal_id, epoch, *row in found:
                try:
                    taken.append((stored_goal(row), Fence(owner, epoch + 1)))
                except DecodeError:
                    unreadable.append(goal_id)
            lease = lease_end(self.lease_seconds)
            await self._conn.executemany(
                "UPDATE goals SET owner = ?, epoch = ?, lease_ns = ? WHERE goal_id = ?",
                [(owner, fence.epoch, lease, goal.goal_id) for goal, fence in taken],
            )
            await self._conn.executemany(
                "UPDATE goals SET state = ? WHERE goal_id = ?",
                [(pb.GOAL_STATE_FAILED, goal_id) for goal_id in unreadable],
            )
            await self._conn.commit()
        warn_unreadable(unreadable)
        return taken

    async def renew(self, owner: str, goal_ids: Collection[str]) -> set[str]:
        marks = ", ".join("?" * len(UNFINISHED))
        # One statement for them all (the ids as a JSON array): a replica holding tens of thousands
        # renews them in one trip to the database, not one each.
        async with self._lock:
            async with self._conn.execute(
                f"UPDATE goals SET lease_ns = CASE WHEN state IN ({marks}) THEN ? ELSE lease_ns END"
                " WHERE goal_id IN (SELECT value FROM json_each(?)) AND owner = ? RETURNING goal_id",
                (*UNFINISHED, lease_end(self.lease_seconds), json.dumps(list(goal_ids)), owner),
            ) as rows:
                held = {row[0] for row in await rows.fetchall()}
            await self._conn.commit()
        return held

    async def request_cancel(self, goal_id: str, reason: str) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT INTO goal_cancels (goal_id, reason) SELECT goal_id, ? FROM goals WHERE goal_id = ?"
                " ON CONFLICT (goal_id) DO UPDATE SET reason = excluded.reason",
                (reason, goal_id),
            )
            await self._conn.commit()

    async def take_cancels(self, owner: str) -> list[tuple[str, str]]:
        async with self._lock:
            async with self._conn.execute(
                "DELETE FROM goal_cancels WHERE goal_id IN (SELECT goal_id FROM goals WHERE owner = ?)"
                " RETURNING goal_id, reason",
                (owner,),
            ) as rows:
                taken = [(str(goal_id), str(reason)) for goal_id, reason in await rows.fetchall()]
            await self._conn.commit()
        return taken

    async def events(self, goal_id: str, *, after_sequence: int) -> list[GoalEvent]:
        async with (
            self._lock,
            self._conn.execute(
                "SELECT event FROM goal_events WHERE goal_id = ? AND sequence > ? ORDER BY sequence",
                (goal_id, after_sequence),
            ) as rows,
        ):
            return [GoalEvent.FromString(row[0]) for row in await rows.fetchall()]

    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask], *, keep: int) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT INTO goal_memory (goal_key, position, goal, subtasks)"
                " VALUES (?, (SELECT COALESCE(MAX(position), 0) + 1 FROM goal_memory), ?, ?)"
                " ON CONFLICT (goal_key) DO UPDATE SET position = excluded.position, subtasks = excluded.subtasks",
                (memory_key(goal), goal, pack_subtasks(subtasks)),
            )
            await self._conn.execute(
                "DELETE FROM goal_memory WHERE position <="
                " (SELECT position FROM goal_memory ORDER BY position DESC LIMIT 1 OFFSET ?)",
                (keep,),
            )
            await self._conn.commit()

    async def learnt(self, *, after: int, limit: int) -> list[Learnt]:
        async with (
            self._lock,
            self._conn.execute(
                "SELECT position, goal, subtasks FROM goal_memory WHERE position > ? ORDER BY position LIMIT ?",
                (after, limit),
            ) as rows,
        ):
            return learnt_rows([tuple(row) for row in await rows.fetchall()])
