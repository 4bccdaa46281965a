"""The one way a tier reaches PostgreSQL: a pool of asyncpg connections to a database whose schema is
brought up to date first, by numbered migrations that every store shares (one database holds the
runs, the goals and Execute's executions alike)."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: A connection of its own or one lent by a pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

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
)

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
    ``close``.

    Args:
        url: The database's ``postgresql://`` URL.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"the {type(self).__name__} is not open")
        return self._pool

    async def open(self) -> None:
        """Connects, bringing the schema up to date."""
        self._pool = await connect(self._url)

    async def close(self) -> None:
        """Closes the pool's connections."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
