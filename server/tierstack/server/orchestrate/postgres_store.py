"""Runs in PostgreSQL (asyncpg): the store several Orchestrate replicas share.

Each write is one transaction whose statements check the writers' fences and the lifecycle in their
``WHERE`` clauses, so a concurrent claim (which takes the run's row lock) waits for it or refuses it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from google.protobuf.message import DecodeError

from tierstack.core.errors import NotFoundError
from tierstack.core.lifecycle import DEFAULT_LEASE_SECONDS, RUN_LIFECYCLE, Fence, StaleOwnerError
from tierstack.server import postgres
from tierstack.server.auth.quota import too_many_unfinished
from tierstack.server.orchestrate.store import (
    SOURCES,
    UNFINISHED,
    Run,
    RunEvent,
    RunStore,
    StoredRun,
    check_follows,
    ended_ns,
    request_key,
    stored_run,
    unreadable_run,
    warn_unreadable,
)

#: The channel that names each run whose events or state changed, as its transaction commits.
CHANGES = "tierstack_runs"


class PostgresRunStore(postgres.Pooled, RunStore):
    """Stores runs and their events in a PostgreSQL database, which replicas share.

    Args:
        url: The database's ``postgresql://`` URL; its schema is migrated when the store opens.
        lease_seconds: How long a claim holds a run without being renewed.
    """

    shared = True

    def __init__(self, url: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        super().__init__(url, CHANGES)
        self.lease_seconds = lease_seconds

    async def wait_changed(self, run_id: str, timeout: float) -> None:
        await self._heard(run_id, timeout)

    async def create_run(self, stored: StoredRun, owner: str, *, most: int = 0) -> tuple[Run, Fence | None]:
        run = stored.run
        while True:
            async with self._db.acquire() as connection, connection.transaction(isolation="read_committed"):
                if most:
                    await postgres.hold_tenant(connection, "runs", run.tenant_id)
                created = await connection.fetchval(
                    "INSERT INTO runs"
                    " (run_id, request_id, state, create_ns, owner, epoch, run, workflow, limits, tenant, lease_ns)"
                    f" SELECT $1, $2, $3, $4, $5, 1, $6, $7, $8, $9, {postgres.lease_from_now(self.lease_seconds)}"
                    " WHERE $10 = 0 OR (SELECT count(*) FROM runs WHERE tenant = $9 AND end_ns IS NULL) < $10"
                    " ON CONFLICT (request_id) DO NOTHING RETURNING run_id",
                    run.run_id,
                    request_key(run),
                    run.state,
                    run.create_time.ToNanoseconds(),
                    owner,
                    run.SerializeToString(),
                    stored.workflow.SerializeToString(),
                    stored.limits.SerializeToString(),
                    run.tenant_id,
                    most,
                )
                if created is not None:
                    return run, Fence(owner, 1)
                held = await connection.fetchval("SELECT run FROM runs WHERE request_id = $1", request_key(run))
                full = (
                    held is None
                    and most
                    and await connection.fetchval(
                        "SELECT count(*) >= $2 FROM runs WHERE tenant = $1 AND end_ns IS NULL", run.tenant_id, most
                    )
                )
            if held is not None:
                return Run.FromString(held), None
            if full:
                raise too_many_unfinished("runs", most)
            # else the run holding the request id was deleted in between: insert again

    async def claim(self, run_id: str, owner: str, transition: str) -> tuple[StoredRun, Fence]:
        async with self._db.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "SELECT run, workflow, limits, epoch FROM runs WHERE run_id = $1 FOR UPDATE", run_id
            )
            if row is None:
                raise NotFoundError("run", run_id)
            stored = stored_run((row["run"], row["workflow"], row["limits"]))
            stored.run.state = RUN_LIFECYCLE.next(run_id, stored.run.state, transition)  # type: ignore[assignment]
            fence = Fence(owner, row["epoch"] + 1)
            await connection.execute(
                "UPDATE runs SET state = $1, run = $2, end_ns = $3, owner = $4, epoch = $5,"
                f" lease_ns = {postgres.lease_from_now(self.lease_seconds)} WHERE run_id = $6",
                stored.run.state,
                stored.run.SerializeToString(),
                ended_ns(stored.run),
                owner,
                fence.epoch,
                run_id,
            )
            await connection.execute("SELECT pg_notify($1, $2)", CHANGES, run_id)
        return stored, fence

    async def write(self, runs: Sequence[Run], events: Sequence[RunEvent], fences: Mapping[str, Fence]) -> None:
        recorded = [run.run_id for run in runs]
        others = sorted({event.run_id for event in events} - set(recorded))
        async with self._db.acquire() as connection, connection.transaction():
            # Rows locked in one order, whatever the batch's: two writers (or a renewal) never wait
            # on each other in a circle.
            await connection.execute(
                "SELECT 1 FROM runs WHERE run_id = ANY($1::text[]) ORDER BY run_id FOR UPDATE", [*recorded, *others]
            )
            changed = await connection.fetch(
                "UPDATE runs AS r SET state = w.state, run = w.run, end_ns = w.end_ns"
                " FROM unnest($1::text[], $2::int[], $3::bytea[], $4::bigint[], $5::text[], $6::bigint[], $7::int[])"
                " AS w (run_id, state, run, end_ns, owner, epoch, sources)"
                " WHERE r.run_id = w.run_id AND r.owner = w.owner AND r.epoch = w.epoch"
                " AND (w.sources >> r.state) & 1 = 1 RETURNING r.run_id",
                recorded,
                [run.state for run in runs],
                [run.SerializeToString() for run in runs],
                [ended_ns(run) for run in runs],
                [fences[run.run_id].owner for run in runs],
                [fences[run.run_id].epoch for run in runs],
                [SOURCES[run.state] for run in runs],
            )
            # A run whose events alone are written: the same fence check, holding its row until commit.
            kept = await connection.fetch(
                "SELECT r.run_id FROM runs AS r JOIN unnest($1::text[], $2::text[], $3::bigint[])"
                " AS w (run_id, owner, epoch) ON r.run_id = w.run_id AND r.owner = w.owner AND r.epoch = w.epoch"
                " FOR SHARE OF r",
                others,
                [fences[run_id].owner for run_id in others],
                [fences[run_id].epoch for run_id in others],
            )
            if len(changed) + len(kept) != len(recorded) + len(others):
                await self._refuse(connection, runs, others, fences)
            await connection.execute(
                "INSERT INTO run_events (run_id, sequence, event)"
                " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])",
                [event.run_id for event in events],
                [event.sequence for event in events],
                [event.SerializeToString() for event in events],
            )
            # Watchers on other replicas hear of it once this commits.
            await connection.execute(
                "SELECT pg_notify($1, run_id) FROM unnest($2::text[]) AS changed (run_id)",
                CHANGES,
                sorted({*recorded, *others}),
            )

    async def _refuse(
        self, connection: postgres.Connection, runs: Sequence[Run], others: Sequence[str], fences: Mapping[str, Fence]
    ) -> None:
        """Finds the run a write may not change and raises why (the transaction rolls back).

        Raises:
            StaleOwnerError: A fence is stale.
            IllegalTransitionError: A record's state cannot follow the stored one.
        """
        records = {run.run_id: run for run in runs}
        for run_id in [*records, *others]:
            row = await connection.fetchrow("SELECT owner, epoch, state FROM runs WHERE run_id = $1", run_id)
            if row is None or Fence(row["owner"], row["epoch"]) != fences[run_id]:
                raise StaleOwnerError("run", run_id, fences[run_id])
            if run_id in records:
                check_follows(records[run_id], row["state"])
        raise AssertionError("a write was refused for no reason found")

    async def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        record = await self._db.fetchval(
            "SELECT run FROM runs WHERE run_id = $1 AND tenant = coalesce($2, tenant)", run_id, tenant
        )
        return Run.FromString(record) if record is not None else None

    async def get_stored(self, run_id: str, *, tenant: str | None = None) -> StoredRun | None:
        row = await self._db.fetchrow(
            "SELECT run, workflow, limits FROM runs WHERE run_id = $1 AND tenant = coalesce($2, tenant)", run_id, tenant
        )
        return stored_run(tuple(row)) if row is not None else None

    async def list_runs(
        self, *, limit: int, after: tuple[int, str] | None, state: int, tenant: str | None = None
    ) -> list[Run]:
        after_ns, after_id = after if after is not None else (None, None)
        rows = await self._db.fetch(
            "SELECT run FROM runs WHERE ($1::bigint IS NULL OR (create_ns, run_id) < ($1, $2))"
            " AND ($3 = 0 OR state = $3) AND tenant = coalesce($5, tenant)"
            " ORDER BY create_ns DESC, run_id DESC LIMIT $4",
            after_ns,
            after_id,
            state,
            limit,
            tenant,
        )
        return [Run.FromString(row["run"]) for row in rows]

    async def take_over(
        self, owner: str, *, limit: int | None, at_start: bool = False, driven: Collection[str] = ()
    ) -> list[tuple[StoredRun, Fence]]:
        async with self._db.acquire() as connection, connection.transaction():
            # Rows another replica is taking over at this moment are skipped, not waited for.
            rows = await connection.fetch(
                "SELECT run_id, run, workflow, limits, epoch FROM runs WHERE state = ANY($1::int[])"
                f" AND ((lease_ns < {postgres.NOW_NS} AND NOT run_id = ANY($4::text[])) OR owner = $2)"
                " ORDER BY create_ns LIMIT $3 FOR UPDATE SKIP LOCKED",
                list(UNFINISHED),
                owner if at_start else None,
                limit,
                list(driven),
            )
            taken, unreadable = [], []
            for row in rows:
                try:
                    stored = stored_run((row["run"], row["workflow"], row["limits"]))
                except DecodeError:
                    unreadable.append(row["run_id"])
                else:
                    taken.append((stored, Fence(owner, row["epoch"] + 1)))
            await connection.execute(
                "UPDATE runs AS r SET owner = $1, epoch = r.epoch + 1,"
                f" lease_ns = {postgres.lease_from_now(self.lease_seconds)} WHERE r.run_id = ANY($2::text[])",
                owner,
                [stored.run.run_id for stored, _ in taken],
            )
            await connection.executemany(
                "UPDATE runs SET state = $1, run = $2, end_ns = $3 WHERE run_id = $4",
                [(*unreadable_run(run_id), run_id) for run_id in unreadable],
            )
        warn_unreadable(unreadable)
        return taken

    async def renew(self, owner: str, run_ids: Collection[str]) -> set[str]:
        rows = await self._db.fetch(
            "UPDATE runs SET lease_ns = CASE WHEN state = ANY($1::int[])"
            f" THEN {postgres.lease_from_now(self.lease_seconds)} ELSE lease_ns END"
            " WHERE run_id IN (SELECT run_id FROM runs WHERE run_id = ANY($2::text[]) AND owner = $3"
            " ORDER BY run_id FOR UPDATE) RETURNING run_id",
            list(UNFINISHED),
            list(run_ids),
            owner,
        )
        return {row["run_id"] for row in rows}

    async def request_control(self, run_id: str, kind: str, reason: str) -> None:
        async with self._db.acquire() as connection, connection.transaction():
            await connection.execute(
                "INSERT INTO run_controls (run_id, kind, reason) VALUES ($1, $2, $3)"
                " ON CONFLICT (run_id) DO UPDATE SET kind = excluded.kind, reason = excluded.reason",
                run_id,
                kind,
                reason,
            )
            # Wakes the owner's keeper, which takes the request at once.
            await connection.execute(
                "SELECT pg_notify($1, 'owner:' || owner) FROM runs WHERE run_id = $2", CHANGES, run_id
            )

    async def take_controls(self, owner: str) -> list[tuple[str, str, str]]:
        rows = await self._db.fetch(
            "DELETE FROM run_controls AS c USING runs AS r WHERE c.run_id = r.run_id AND r.owner = $1"
            " RETURNING c.run_id, c.kind, c.reason",
            owner,
        )
        return [(row["run_id"], row["kind"], row["reason"]) for row in rows]

    async def events(self, run_id: str, *, after_sequence: int, limit: int | None = None) -> list[RunEvent]:
        rows = await self._db.fetch(
            "SELECT event FROM run_events WHERE run_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
            run_id,
            after_sequence,
            limit,
        )
        return [RunEvent.FromString(row["event"]) for row in rows]

    async def finished_before(self, end_ns: int, *, limit: int) -> list[str]:
        rows = await self._db.fetch(
            "SELECT run_id FROM runs WHERE end_ns IS NOT NULL AND end_ns < $1 ORDER BY end_ns LIMIT $2", end_ns, limit
        )
        return [row["run_id"] for row in rows]

    async def delete_runs(self, run_ids: Sequence[str]) -> None:
        async with self._db.acquire() as connection, connection.transaction():
            await connection.execute("DELETE FROM run_controls WHERE run_id = ANY($1::text[])", list(run_ids))
            await connection.execute("DELETE FROM run_events WHERE run_id = ANY($1::text[])", list(run_ids))
            await connection.execute("DELETE FROM runs WHERE run_id = ANY($1::text[])", list(run_ids))
