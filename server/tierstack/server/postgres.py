"""The one way a tier reaches PostgreSQL: a pool of asyncpg connections to a database whose schema is
brought up to date first, by numbered migrations that every store shares (one database holds the
runs, the goals and Execute's executions alike)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: A connection of its own or one lent by a pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

_log = logging.getLogger(__name__)
# How long a lost listening connection waits before it is made again, at first and at most, in seconds.
_RECONNECT_FIRST = 0.1
_RECONNECT_MOST = 5.0

#: The schema of the whole database, one migration after another; ``tierstack_schema`` records
#: which were applied. A migration is never edited once released: a change is a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: runs and their events (Orchestrate), goals and theirs (Coordinate), finished executions
    # and approvals (Execute).
    """
    CREATE TABLE runs (
        run_id text PRIMARY KEY,
        request_id text UNIQUE,
        state integer NOT NULL,
        create_ns bigint NOT NULL,
        end_ns bigint,
        owner text NOT NULL,
        epoch bigint NOT NULL,
        run bytea NOT NULL,
        workflow bytea NOT NULL,
        limits bytea NOT NULL
    );
    CREATE INDEX runs_by_time ON runs (create_ns DESC, run_id DESC);
    CREATE INDEX runs_by_end ON runs (end_ns) WHERE end_ns IS NOT NULL;
    CREATE INDEX runs_unfinished ON runs (create_ns) WHERE state IN (1, 2);
    CREATE TABLE run_events (
        run_id text NOT NULL,
        sequence bigint NOT NULL,
        event bytea NOT NULL,
        PRIMARY KEY (run_id, sequence)
    );
    CREATE TABLE goals (
        goal_id text PRIMARY KEY,
        request_id text UNIQUE,
        state integer NOT NULL,
        create_ns bigint NOT NULL,
        owner text NOT NULL,
        epoch bigint NOT NULL,
        last_sequence bigint NOT NULL,
        goal bytea NOT NULL
    );
    CREATE INDEX goals_by_time ON goals (create_ns DESC, goal_id DESC);
    CREATE INDEX goals_unfinished ON goals (create_ns) WHERE state IN (1, 2);
    CREATE TABLE goal_events (
        goal_id text NOT NULL,
        sequence bigint NOT NULL,
        event bytea NOT NULL,
        PRIMARY KEY (goal_id, sequence)
    );
    CREATE TABLE executions (
        execution_id text PRIMARY KEY,
        finish_ns bigint NOT NULL,
        events bytea NOT NULL
    );
    CREATE INDEX executions_by_finish ON executions (finish_ns);
    CREATE TABLE approvals (
        approval_id text PRIMARY KEY,
        execution_id text NOT NULL,
        call_index integer NOT NULL,
        tool text NOT NULL,
        arguments bytea NOT NULL,
        expire_ns bigint NOT NULL,
        decided boolean NOT NULL DEFAULT false,
        rejection text NOT NULL DEFAULT '',
        UNIQUE (execution_id, call_index)
    );
    """,
    # 2: the end of the owner's lease on a run (ns since the epoch), and requests for a run's owner.
    """
    ALTER TABLE runs ADD COLUMN lease_ns bigint NOT NULL DEFAULT 0;
    CREATE INDEX runs_by_lease ON runs (lease_ns) WHERE state IN (1, 2);
    CREATE INDEX runs_by_owner ON runs (owner) WHERE state IN (1, 2);
    CREATE TABLE run_controls (
        run_id text PRIMARY KEY,
        kind text NOT NULL,
        reason text NOT NULL
    );
    """,
    # 3: the same for goals: leases, and requests to cancel one.
    """
    ALTER TABLE goals ADD COLUMN lease_ns bigint NOT NULL DEFAULT 0;
    CREATE INDEX goals_by_lease ON goals (lease_ns) WHERE state IN (1, 2);
    CREATE INDEX goals_by_owner ON goals (owner) WHERE state IN (1, 2);
    CREATE TABLE goal_cancels (
        goal_id text PRIMARY KEY,
        reason text NOT NULL
    );
    """,
    # 4: which Execute replica runs an execution now, under a lease.
    """
    CREATE TABLE execution_flights (
        execution_id text PRIMARY KEY,
        owner text NOT NULL,
        lease_ns bigint NOT NULL
    );
    """,
    # 5: how many times replicas were asked to stop an execution (kept until it finishes).
    """
    CREATE TABLE execution_cancels (
        execution_id text PRIMARY KEY,
        requests bigint NOT NULL,
        request_ns bigint NOT NULL
    );
    CREATE INDEX execution_cancels_by_time ON execution_cancels (request_ns);
    """,
    # 6: the goal memory (Coordinate): each goal's decomposition, by a digest of the goal, in the
    # order learnt.
    """
    CREATE TABLE goal_memory (
        goal_key bytea PRIMARY KEY,
        position bigint NOT NULL UNIQUE,
        goal text NOT NULL,
        subtasks bytea NOT NULL
    );
    """,
    # 7: API keys: each key's tenant and role, and a digest of its secret.
    """
    CREATE TABLE api_keys (
        key_id text PRIMARY KEY,
        tenant text NOT NULL,
        role integer NOT NULL,
        name text NOT NULL,
        create_ns bigint NOT NULL,
        revoked boolean NOT NULL DEFAULT false,
        digest bytea NOT NULL
    );
    """,
    # 8: the tenant each run and goal belongs to (a request id is unique within its tenant: the
    # column holds it namespaced by the tenant), listed a tenant at a time.
    """
    ALTER TABLE runs ADD COLUMN tenant text NOT NULL DEFAULT '';
    CREATE INDEX runs_by_tenant ON runs (tenant, create_ns DESC, run_id DESC);
    ALTER TABLE goals ADD COLUMN tenant text NOT NULL DEFAULT '';
    CREATE INDEX goals_by_tenant ON goals (tenant, create_ns DESC, goal_id DESC);
    """,
    # 9: each tenant's unfinished runs and goals, counted against its quotas.
    """
    CREATE INDEX runs_unfinished_by_tenant ON runs (tenant) WHERE end_ns IS NULL;
    CREATE INDEX goals_unfinished_by_tenant ON goals (tenant) WHERE state IN (1, 2);
    """,
)

#: Now, in ns since the epoch, by the database's clock: leases are taken and compared by this one
#: clock, so that clocks of the replicas' hosts that disagree cannot let one take live work over.
NOW_NS = "(extract(epoch from clock_timestamp()) * 1000000000)::bigint"


def lease_from_now(seconds: float) -> str:
    """Returns the SQL for the end of a lease taken now for ``seconds``, by the database's clock."""
    return f"({NOW_NS} + {int(seconds * 1e9)})"


async def hold_tenant(connection: Connection, kind: str, tenant: str) -> None:
    """Takes, until the transaction ends, the lock of ``tenant``'s ``kind`` of work (``runs``,
    ``goals``), so that replicas count and add a tenant's work one at a time: two counts read
    before either insert could both pass a quota."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{kind}:{tenant}")


# Replicas starting together migrate one at a time: the others wait on this lock, then find
# nothing left to do.
_MIGRATION_LOCK = 0x7469657273  # "tiers"


async def migrate(connection: Connection, *, to: int = len(MIGRATIONS)) -> int:
    """Applies the migrations the database lacks, up to number ``to``, in one transaction; returns
    the schema version it is at now."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS tierstack_schema"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version = int(await connection.fetchval("SELECT COALESCE(MAX(version), 0) FROM tierstack_schema"))
        for number in range(version + 1, to + 1):
            await connection.execute(MIGRATIONS[number - 1])
            await connection.execute("INSERT INTO tierstack_schema (version) VALUES ($1)", number)
        return max(version, to)


async def connect(url: str, *, max_size: int = 10) -> asyncpg.Pool:
    """Returns a pool of connections to the database at ``url`` (``postgresql://…``), its schema
    migrated to the latest version."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=max_size)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
    except BaseException:
        await pool.close()
        raise
    return pool


class Pooled:
    """The pool of a store kept in PostgreSQL: opened (the schema migrated) by ``open``, released by
    ``close``; with a ``channel``, also the notifications on it (see :class:`Changes`).

    Args:
        url: The database's ``postgresql://`` URL.
        channel: The channel whose notifications the store's waiters hear, if any.
    """

    def __init__(self, url: str, channel: str | None = None) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None
        self._changes = Changes(url, channel) if channel is not None else None

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"the {type(self).__name__} is not open")
        return self._pool

    async def open(self) -> None:
        """Connects, bringing the schema up to date, and listens."""
        self._pool = await connect(self._url)
        try:
            if self._changes is not None:
                await self._changes.open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stops listening and closes the pool's connections."""
        if self._changes is not None:
            await self._changes.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _heard(self, key: str, timeout: float) -> None:
        """Returns once ``key`` is named on the channel, or after ``timeout`` seconds."""
        assert self._changes is not None, "a store with a channel"
        await self._changes.wait(key, timeout)


class Changes:
    """The notifications of one channel (``LISTEN``), each naming what changed (a run, a goal), for
    the tasks that wait on it. A notification missed (one sent while the listening connection was
    lost, or just before a task began to wait) costs that task its ``timeout``, never an event: the
    waiter reads the store again either way. A lost connection wakes every waiter (what changed
    meanwhile cannot be known) and is made again, sooner the first tries, then every few seconds.

    Args:
        url: The database's URL.
        channel: The channel's name.
    """

    def __init__(self, url: str, channel: str) -> None:
        self._url = url
        self._channel = channel
        self._connection: asyncpg.Connection[Any] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._waiting: dict[str, set[asyncio.Event]] = {}  # one entry per waiting task, removed as it ends

    async def open(self) -> None:
        """Starts listening, on a connection of its own."""
        connection = await asyncpg.connect(self._url)
        try:
            await connection.add_listener(self._channel, self._heard)
        except BaseException:
            await connection.close()
            raise
        connection.add_termination_listener(self._lost)
        self._connection = connection

    async def close(self) -> None:
        """Stops listening."""
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
            self._reconnecting = None
        if self._connection is not None:
            self._connection.remove_termination_listener(self._lost)
            await self._connection.close()
            self._connection = None

    def _lost(self, connection: Connection) -> None:
        self._connection = None
        for waiters in self._waiting.values():
            for waiter in waiters:
                waiter.set()
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="tierstack-listen")

    async def _reconnect(self) -> None:
        delay = _RECONNECT_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                await self.open()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("listening for %s: cannot reconnect yet (%s)", self._channel, type(exc).__name__)
                delay = min(delay * 2, _RECONNECT_MOST)
            else:
                return

    def _heard(self, connection: Connection, pid: int, channel: str, payload: object) -> None:
        for waiter in self._waiting.get(str(payload), ()):
            waiter.set()

    async def wait(self, key: str, timeout: float) -> bool:
        """Returns once ``key`` is named on the channel (or the connection is lost): True; or after
        ``timeout`` seconds: False."""
        waiter = asyncio.Event()
        waiters = self._waiting.setdefault(key, set())
        waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout)
            return waiter.is_set()
        finally:
            waiters.discard(waiter)
            if not waiters:
                del self._waiting[key]
