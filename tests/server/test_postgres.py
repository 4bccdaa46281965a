"""The PostgreSQL store's schema: migrations applied once however many replicas start together, an
older database brought up to date, and ``tierstack migrate``; and a listener that outlives its
connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from tests.helpers import start_tier
from tierstack.client import NotFoundError, OrchestratorClient, UnavailableError
from tierstack.server import Settings, postgres
from tierstack.server.conformance.runs import event, new_run
from tierstack.server.orchestrate.postgres_store import PostgresRunStore
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.postgres import LocalPostgres


async def _versions(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        return [row["version"] for row in await connection.fetch("SELECT version FROM tierstack_schema ORDER BY 1")]
    finally:
        await connection.close()


async def test_replicas_starting_together_migrate_the_database_once(postgres_server: LocalPostgres) -> None:
    url = postgres_server.new_database()
    pools = await asyncio.gather(*(postgres.connect(url, max_size=1) for _ in range(6)))
    for pool in pools:
        await pool.close()
    assert await _versions(url) == list(range(1, len(postgres.MIGRATIONS) + 1))


async def test_a_database_of_every_earlier_schema_is_brought_up_to_date(postgres_server: LocalPostgres) -> None:
    for earlier in range(len(postgres.MIGRATIONS)):
        url = postgres_server.new_database()
        connection = await asyncpg.connect(url)
        try:
            assert await postgres.migrate(connection, to=earlier) == earlier
        finally:
            await connection.close()
        store = PostgresRunStore(url)
        await store.open()
        try:
            _, fence = await store.create_run(new_run("r1", state=pb.RUN_STATE_RUNNING), "owner")
            assert fence is not None
            await store.write([pb.Run(run_id="r1", state=pb.RUN_STATE_COMPLETED)], [event("r1", 1)], {"r1": fence})
            assert [e.sequence for e in await store.events("r1", after_sequence=0)] == [1]
        finally:
            await store.close()
        assert await _versions(url) == list(range(1, len(postgres.MIGRATIONS) + 1))


async def test_tierstack_migrate_brings_a_postgresql_store_up_to_date(postgres_server: LocalPostgres) -> None:
    url = postgres_server.new_database()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tierstack.cli", "migrate", "--store", url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"schema version {len(postgres.MIGRATIONS)}" in done.stdout
    assert await _versions(url) == list(range(1, len(postgres.MIGRATIONS) + 1))


async def _listening(connection: asyncpg.Connection, channel: str) -> set[int]:
    rows = await connection.fetch(
        "SELECT pid FROM pg_stat_activity WHERE query = $1 AND pid <> pg_backend_pid()", f'LISTEN "{channel}"'
    )
    return {row["pid"] for row in rows}


async def test_a_listener_whose_connection_is_lost_listens_again(postgres_server: LocalPostgres) -> None:
    url = postgres_server.new_database()
    changes = postgres.Changes(url, "test_changes")
    admin = await asyncpg.connect(url)
    await changes.open()
    try:
        (first,) = await _listening(admin, "test_changes")
        await admin.execute("SELECT pg_terminate_backend($1)", first)  # as a restart or a network cut would
        for _ in range(200):
            if (again := await _listening(admin, "test_changes")) - {first}:
                break
            await asyncio.sleep(0.05)
        assert again and first not in again
        waiting = asyncio.create_task(changes.wait("run-1", 30))
        await asyncio.sleep(0)
        await admin.execute("SELECT pg_notify('test_changes', 'run-1')")
        assert await waiting  # heard, not timed out
    finally:
        await changes.close()
        await admin.close()


async def test_a_tier_whose_database_is_down_answers_unavailable_and_serves_on_once_it_is_back() -> None:
    with LocalPostgres(durable=True) as database:  # what was committed survives the crash
        server = await start_tier("orchestrate", Settings(store_url=database.url))
        try:
            async with OrchestratorClient(server.target, timeout=10) as client:
                with pytest.raises(NotFoundError):
                    await client.get_run("r1")
                await asyncio.to_thread(database.crash)
                for _ in range(3):  # the pool's broken connections, then refused new ones
                    with pytest.raises(UnavailableError) as down:
                        await client.get_run("r1")
                    assert "store" in down.value.message and str(database.port) not in down.value.message
                await asyncio.to_thread(database.restart)
                with pytest.raises(NotFoundError):
                    await client.get_run("r1")
        finally:
            await server.stop()
