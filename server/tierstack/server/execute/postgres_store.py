"""Finished executions, the executions replicas run now, and approvals in PostgreSQL (asyncpg),
shared by Execute replicas: an execution one replica finished is replayed by any, and one that a
replica runs is not run by another meanwhile (the other replays its end). An execution is stopped,
and an approval answered, on any replica: the replica whose step it concerns hears of it by
``NOTIFY`` and reads it here."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from tierstack.core.lifecycle import DEFAULT_LEASE_SECONDS
from tierstack.server import postgres
from tierstack.server.execute.store import (
    APPROVAL_COLUMNS,
    DEFAULT_MAX_BYTES,
    Approval,
    ExecutionEvent,
    ExecutionStore,
    approval_of_row,
    pack_events,
    stop_key,
    unpack_events,
)

# The byte budget is kept by a trim that every replica runs once it has added a sixteenth of it, so
# the table holds at most the budget and a sixteenth per replica.
_TRIM_SHARE = 16


#: The channel that names each execution as it finishes or is asked to stop, and each approval as
#: it is answered.
CHANGES = "tierstack_executions"


class PostgresExecutionStore(postgres.Pooled, ExecutionStore):
    """Keeps finished executions, the executions replicas run now, and approvals in a PostgreSQL
    database.

    Args:
        url: The database's ``postgresql://`` URL; its schema is migrated when the store opens.
        max_bytes: The most bytes of finished executions' events kept.
        lease_seconds: How long a replica holds an execution it runs without renewing.
    """

    shared = True

    def __init__(
        self, url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> None:
        super().__init__(url, CHANGES)
        self._max_bytes = max_bytes
        self.lease_seconds = lease_seconds
        self._added = 0  # bytes this replica stored since its last trim

    async def open(self) -> None:
        await super().open()
        try:
            await self._trim()
        except BaseException:
            await self.close()
            raise

    async def begin(self, execution_id: str, owner: str) -> bool:
        # A claim starts the execution afresh: the requests to stop it before are cleared with it.
        claimed = await self._db.fetchval(
            "WITH claimed AS (INSERT INTO execution_flights (execution_id, owner, lease_ns)"
            f" SELECT $1, $2, {postgres.lease_from_now(self.lease_seconds)}"
            " WHERE NOT EXISTS (SELECT 1 FROM executions WHERE execution_id = $1)"
            " ON CONFLICT (execution_id) DO UPDATE SET owner = excluded.owner, lease_ns = excluded.lease_ns"
            f" WHERE execution_flights.lease_ns < {postgres.NOW_NS} OR execution_flights.owner = excluded.owner"
            " RETURNING execution_id),"
            " cleared AS (DELETE FROM execution_cancels WHERE execution_id IN (SELECT execution_id FROM claimed))"
            " SELECT 1 FROM claimed",
            execution_id,
            owner,
        )
        return claimed is not None

    async def hold(self, execution_ids: Collection[str], owner: str) -> None:
        await self._db.execute(
            f"UPDATE execution_flights SET lease_ns = {postgres.lease_from_now(self.lease_seconds)}"
            " WHERE execution_id = ANY($1::text[]) AND owner = $2",
            list(execution_ids),
            owner,
        )

    async def release(self, execution_id: str, owner: str) -> None:
        await self._db.execute(
            "DELETE FROM execution_flights WHERE execution_id = $1 AND owner = $2", execution_id, owner
        )

    async def wait_changed(self, key: str, timeout: float) -> None:
        await self._heard(key, timeout)

    async def request_cancel(self, execution_id: str) -> bool:
        # Recorded only for an execution some replica has claimed (so the table holds no more rows
        # than executions run); heard by its runner and its followers at commit.
        async with self._db.acquire() as connection, connection.transaction():
            running = await connection.fetchval(
                "INSERT INTO execution_cancels (execution_id, requests, request_ns)"
                " SELECT execution_id, 1, $2 FROM execution_flights WHERE execution_id = $1"
                " ON CONFLICT (execution_id) DO UPDATE"
                " SET requests = execution_cancels.requests + 1, request_ns = excluded.request_ns"
                f" RETURNING (SELECT lease_ns >= {postgres.NOW_NS} FROM execution_flights WHERE execution_id = $1)",
                execution_id,
                time.time_ns(),
            )
            await connection.execute("SELECT pg_notify($1, $2)", CHANGES, stop_key(execution_id))
        return bool(running)

    async def cancels(self, execution_id: str) -> int:
        requests = await self._db.fetchval(
            "SELECT requests FROM execution_cancels WHERE execution_id = $1", execution_id
        )
        return int(requests or 0)

    async def _trim(self) -> None:
        """Forgets the executions finished longest ago while those kept are over the byte budget."""
        self._added = 0
        await self._db.execute(
            "DELETE FROM executions WHERE execution_id IN (SELECT execution_id FROM (SELECT execution_id,"
            " SUM(octet_length(events)) OVER (ORDER BY finish_ns DESC, execution_id) AS kept FROM executions)"
            " AS newest_first WHERE kept > $1)",
            self._max_bytes,
        )

    async def finished(self, execution_id: str) -> list[ExecutionEvent] | None:
        events = await self._db.fetchval("SELECT events FROM executions WHERE execution_id = $1", execution_id)
        return None if events is None else unpack_events(events)

    async def finish(self, execution_id: str, events: Sequence[ExecutionEvent]) -> None:
        packed = pack_events(events)
        async with self._db.acquire() as connection, connection.transaction():
            stored = await connection.fetchval(
                "INSERT INTO executions (execution_id, finish_ns, events) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING octet_length(events)",
                execution_id,
                time.time_ns(),
                packed,
            )
            await connection.execute("DELETE FROM execution_flights WHERE execution_id = $1", execution_id)
            await connection.execute("DELETE FROM execution_cancels WHERE execution_id = $1", execution_id)
            await connection.execute("SELECT pg_notify($1, $2)", CHANGES, execution_id)  # heard at commit
        self._added += stored or 0
        if self._added * _TRIM_SHARE > self._max_bytes:
            await self._trim()

    async def open_approval(self, approval: Approval) -> Approval:
        await self._db.execute(
            f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, false, '')"
            " ON CONFLICT DO NOTHING",
            approval.approval_id,
            approval.execution_id,
            approval.index,
            approval.tool,
            approval.arguments,
            approval.expire_ns,
        )
        row = await self._db.fetchrow(
            f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE execution_id = $1 AND call_index = $2",
            approval.execution_id,
            approval.index,
        )
        assert row is not None  # just written, or kept from before
        return approval_of_row(tuple(row))

    async def approval(self, approval_id: str) -> Approval | None:
        row = await self._db.fetchrow(f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE approval_id = $1", approval_id)
        return None if row is None else approval_of_row(tuple(row))

    async def decide(self, approval_id: str, rejection: str | None) -> Approval | None:
        async with self._db.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                f"UPDATE approvals SET decided = true, rejection = $1 WHERE approval_id = $2 AND NOT decided"
                f" RETURNING {APPROVAL_COLUMNS}",
                rejection or "",
                approval_id,
            )
            if row is not None:  # heard at commit by the replica whose step waits for it
                await connection.execute("SELECT pg_notify($1, $2)", CHANGES, approval_id)
        return None if row is None else approval_of_row(tuple(row))

    async def forget_before(self, ns: int) -> int:
        async with self._db.acquire() as connection, connection.transaction():
            forgotten = await connection.fetch("DELETE FROM executions WHERE finish_ns < $1 RETURNING 1", ns)
            await connection.execute("DELETE FROM approvals WHERE expire_ns < $1", ns)
            await connection.execute("DELETE FROM execution_cancels WHERE request_ns < $1", ns)
        return len(forgotten)
