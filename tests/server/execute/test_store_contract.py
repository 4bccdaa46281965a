"""The execution store contract (``tierstack.server.conformance.executions``) on memory, SQLite and
PostgreSQL, its byte budget, and what SQLite alone must do (keep everything across a reopen)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tierstack.server.conformance.executions import *  # noqa: F403 (the suite's tests, run here)
from tierstack.server.conformance.executions import approval, finished_events
from tierstack.server.execute.postgres_store import PostgresExecutionStore
from tierstack.server.execute.store import (
    DEFAULT_MAX_BYTES,
    ExecutionStore,
    MemoryExecutionStore,
    SqliteExecutionStore,
)

BACKENDS = ["memory", "sqlite", "postgresql"]


def _backend(request: pytest.FixtureRequest, tmp_path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ExecutionStore:
    """Returns a store of the backend the test is parametrized with."""
    backend: str = request.param
    if backend == "memory":
        return MemoryExecutionStore(max_bytes=max_bytes)
    if backend == "sqlite":
        return SqliteExecutionStore(tmp_path / "executions.sqlite3", max_bytes=max_bytes)
    return PostgresExecutionStore(request.getfixturevalue("postgres_server").new_database(), max_bytes=max_bytes)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ExecutionStore]:
    backend = _backend(request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


async def test_sqlite_keeps_executions_and_approvals_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "executions.sqlite3"
    first = SqliteExecutionStore(path)
    await first.open()
    await first.finish("e1", finished_events("e1", "x"))
    await first.open_approval(approval("p1"))
    await first.close()
    second = SqliteExecutionStore(path)
    await second.open()
    try:
        assert await second.finished("e1") is not None
        waiting = await second.approval("p1")
        assert waiting is not None and not waiting.decided
    finally:
        await second.close()


@pytest.fixture(params=BACKENDS)
async def small_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ExecutionStore]:
    """A store whose budget holds far fewer executions than the test finishes."""
    backend = _backend(request, tmp_path, max_bytes=4096)
    await backend.open()
    yield backend
    await backend.close()


async def test_finished_executions_are_bounded_in_bytes(small_store: ExecutionStore) -> None:
    store = small_store
    for index in range(200):
        await store.finish(f"e{index}", finished_events(f"e{index}", "x"))
    assert await store.finished("e0") is None  # the first finished are forgotten
    assert await store.finished("e199") is not None
    kept = [index for index in range(200) if await store.finished(f"e{index}") is not None]
    assert 0 < len(kept) < 200 and kept == list(range(200 - len(kept), 200))
