"""Goals in PostgreSQL (asyncpg): the store several Coordinate replicas share.

A write locks the goal's row (``FOR UPDATE``) for its transaction, checks the fence, the expected
state and the lifecycle, numbers the events after the stored last sequence and writes them with the
record, so concurrent writers and claims take turns on that row.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from google.protobuf.message import DecodeError

from tierstack.core.errors import NotFoundError
from tierstack.core.lifecycle import DEFAULT_LEASE_SECONDS, GOAL_LIFECYCLE, Fence, StaleOwnerError
from tierstack.server import postgres
from tierstack.server.auth.quota import too_many_unfinished
from tierstack.server.coordinate.store import (
    UNFINISHED,
    UNFINISHED_SQL,
    Goal,
    GoalEvent,
    GoalStore,
    Learnt,
    Written,
    learnt_rows,
    memory_key,
    new_row,
    next_state,
    number_events,
    pack_subtasks,
    request_key,
    stored_goal,
    tenant_of,
    warn_unreadable,
    written,
)
from tierstack.v1 import coordinator_service_pb2 as pb

_COLUMNS = "goal, state, last_sequence"


# Held by the replica that learns a decomposition, for its transaction.
_LEARN_LOCK = 0x6C6561726E  # "learn"

#: The channel that names each goal whose events or state changed, and each owner a request awaits.
CHANGES = "tierstack_goals"


class PostgresGoalStore(postgres.Pooled, GoalStore):
    """Stores goals and their events in a PostgreSQL database, which replicas share.

    Args:
        url: The database's ``postgresql://`` URL; its schema is migrated when the store opens.
        lease_seconds: How long a claim holds a goal without being renewed.
    """

    shared = True

    def __init__(self, url: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        super().__init__(url, CHANGES)
        self.lease_seconds = lease_seconds

    async def wait_changed(self, key: str, timeout: float) -> None:
        await self._heard(key, timeout)

    async def create_goal(self, goal: Goal, owner: str, *, most: int = 0) -> tuple[Goal, Fence | None]:
        async with self._db.acquire() as connection, connection.transaction(isolation="read_committed"):
            if most:
                await postgres.hold_tenant(connection, "goals", tenant_of(goal))
            created = await connection.fetchval(
                "INSERT INTO goals"
                " (goal_id, request_id, state, create_ns, owner, epoch, last_sequence, goal, tenant, lease_ns)"
                f" SELECT $1, $2, $3, $4, $5, 1, 0, $6, $7, {postgres.lease_from_now(self.lease_seconds)}"
                f" WHERE $8 = 0 OR (SELECT count(*) FROM goals WHERE tenant = $7 AND state IN {UNFINISHED_SQL}) < $8"
                " ON CONFLICT (request_id) DO NOTHING RETURNING goal_id",
                *new_row(goal, owner),
                tenant_of(goal),
                most,
            )
            if created is not None:
                return goal, Fence(owner, 1)
            row = await connection.fetchrow(f"SELECT {_COLUMNS} FROM goals WHERE request_id = $1", request_key(goal))
        if row is None:  # no request id conflicts (goals are never deleted): the quota refused it
            raise too_many_unfinished("goals", most)
        return stored_goal(tuple(row)), None

    async def claim(self, goal_id: str, owner: str) -> Fence:
        async with self._db.acquire() as connection, connection.transaction():
            state = await connection.fetchval("SELECT state FROM goals WHERE goal_id = $1 FOR UPDATE", goal_id)
            if state is None:
                raise NotFoundError("goal", goal_id)
            GOAL_LIFECYCLE.next(goal_id, state, "claim")
            epoch = await connection.fetchval(
                "UPDATE goals SET owner = $1, epoch = epoch + 1,"
                f" lease_ns = {postgres.lease_from_now(self.lease_seconds)} WHERE goal_id = $2 RETURNING epoch",
                owner,
                goal_id,
            )
        return Fence(owner, int(epoch))

    async def write(
        self, goal: Goal, fence: Fence, events: Sequence[GoalEvent], *, transition: str | None = None
    ) -> Written:
        async with self._db.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "SELECT state, owner, epoch, last_sequence FROM goals WHERE goal_id = $1 FOR UPDATE", goal.goal_id
            )
            if row is None:
                raise NotFoundError("goal", goal.goal_id)
            if Fence(row["owner"], row["epoch"]) != fence:
                raise StaleOwnerError("goal", goal.goal_id, fence)
            state = next_state(goal, row["state"], transition)
            last_sequence = row["last_sequence"]
            events = number_events(goal.goal_id, events, last_sequence)
            await connection.execute(
                "UPDATE goals SET state = $1, last_sequence = $2, goal = COALESCE($3, goal) WHERE goal_id = $4",
                state,
                last_sequence + len(events),
                goal.SerializeToString() if transition is not None else None,
                goal.goal_id,
            )
            await connection.execute(
                "INSERT INTO goal_events (goal_id, sequence, event)"
                " SELECT $1, * FROM unnest($2::bigint[], $3::bytea[])",
                goal.goal_id,
                [event.sequence for event in events],
                [event.SerializeToString() for event in events],
            )
            await connection.execute("SELECT pg_notify($1, $2)", CHANGES, goal.goal_id)  # heard at commit
        return written(goal, state, last_sequence, events)

    async def get_goal(self, goal_id: str, *, tenant: str | None = None) -> Goal | None:
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM goals WHERE goal_id = $1 AND tenant = coalesce($2, tenant)", goal_id, tenant
        )
        return stored_goal(tuple(row)) if row is not None else None

    async def list_goals(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Goal]:
        after_ns, after_id = after if after is not None else (None, None)
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM goals WHERE ($1::bigint IS NULL OR (create_ns, goal_id) < ($1, $2))"
            " AND ($3 = 0 OR state = $3) AND tenant = coalesce($5, tenant)"
            " ORDER BY create_ns DESC, goal_id DESC LIMIT $4",
            after_ns,
            after_id,
            state,
            limit,
            tenant,
        )
        return [stored_goal(tuple(row)) for row in rows]

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[Goal, Fence]]:
        async with self._db.acquire() as connection, connection.transaction():
            # Rows another replica is taking over at this moment are skipped, not waited for.
            rows = await connection.fetch(
                f"SELECT goal_id, epoch, {_COLUMNS} FROM goals WHERE state = ANY($1::int[])"
                f" AND ((lease_ns < {postgres.NOW_NS} AND NOT goal_id = ANY($4::text[])) OR owner = $2)"
                " ORDER BY create_ns LIMIT $3 FOR UPDATE SKIP LOCKED",
                list(UNFINISHED),
                owner if at_start else None,
                limit,
                list(driven),
            )
            taken, unreadable = [], []
            for goal_id, epoch, *row in rows:
                try:
                    taken.append((stored_goal(tuple(row)), Fence(owner, epoch + 1)))
                except DecodeError:
                    unreadable.append(goal_id)
            await connection.execute(
                "UPDATE goals SET owner = $1, epoch = epoch + 1,"
                f" lease_ns = {postgres.lease_from_now(self.lease_seconds)} WHERE goal_id = ANY($2::text[])",
                owner,
                [goal.goal_id for goal, _ in taken],
            )
            await connection.execute(
                "UPDATE goals SET state = $1 WHERE goal_id = ANY($2::text[])", pb.GOAL_STATE_FAILED, unreadable
            )
        warn_unreadable(unreadable)
        return taken

    async def renew(self, owner: str, goal_ids: Collection[str]) -> set[str]:
        rows = await self._db.fetch(
            "UPDATE goals SET lease_ns = CASE WHEN state = ANY($1::int[])"
            f" THEN {postgres.lease_from_now(self.lease_seconds)} ELSE lease_ns END"
            " WHERE goal_id IN (SELECT goal_id FROM goals WHERE goal_id = ANY($2::text[]) AND owner = $3"
            " ORDER BY goal_id FOR UPDATE) RETURNING goal_id",
            list(UNFINISHED),
            list(goal_ids),
            owner,
        )
        return {row["goal_id"] for row in rows}

    async def request_cancel(self, goal_id: str, reason: str) -> None:
        async with self._db.acquire() as connection, connection.transaction():
            await connection.execute(
                "INSERT INTO goal_cancels (goal_id, reason) SELECT goal_id, $2 FROM goals WHERE goal_id = $1"
                " ON CONFLICT (goal_id) DO UPDATE SET reason = excluded.reason",
                goal_id,
                reason,
            )
            await connection.execute(
                "SELECT pg_notify($1, 'owner:' || owner) FROM goals WHERE goal_id = $2", CHANGES, goal_id
            )

    async def take_cancels(self, owner: str) -> list[tuple[str, str]]:
        rows = await self._db.fetch(
            "DELETE FROM goal_cancels AS c USING goals AS g WHERE c.goal_id = g.goal_id AND g.owner = $1"
            " RETURNING c.goal_id, c.reason",
            owner,
        )
        return [(row["goal_id"], row["reason"]) for row in rows]

    async def events(self, goal_id: str, *, after_sequence: int) -> list[GoalEvent]:
        rows = await self._db.fetch(
            "SELECT event FROM goal_events WHERE goal_id = $1 AND sequence > $2 ORDER BY sequence",
            goal_id,
            after_sequence,
        )
        return [GoalEvent.FromString(row["event"]) for row in rows]

    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask], *, keep: int) -> None:
        async with self._db.acquire() as connection, connection.transaction():
            # One learner at a time: positions are then committed in the order they are given, so a
            # replica reading past the last position it read misses none.
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _LEARN_LOCK)
            await connection.execute(
                "INSERT INTO goal_memory (goal_key, position, goal, subtasks)"
                " VALUES ($1, (SELECT COALESCE(MAX(position), 0) + 1 FROM goal_memory), $2, $3)"
                " ON CONFLICT (goal_key) DO UPDATE SET position = excluded.position, subtasks = excluded.subtasks",
                memory_key(goal),
                goal,
                pack_subtasks(subtasks),
            )
            await connection.execute(
                "DELETE FROM goal_memory WHERE position <="
                " (SELECT position FROM goal_memory ORDER BY position DESC LIMIT 1 OFFSET $1)",
                keep,
            )

    async def learnt(self, *, after: int, limit: int) -> list[Learnt]:
        rows = await self._db.fetch(
            "SELECT position, goal, subtasks FROM goal_memory WHERE position > $1 ORDER BY position LIMIT $2",
            after,
            limit,
        )
        return learnt_rows([tuple(row) for row in rows])
