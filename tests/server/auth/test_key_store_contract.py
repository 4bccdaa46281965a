"""The key store contract (``tierstack.server.conformance.keys``) on memory, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tierstack.server.auth import KeyStore, MemoryKeyStore, SqliteKeyStore
from tierstack.server.auth.postgres_keys import PostgresKeyStore
from tierstack.server.conformance.keys import *  # noqa: F403 (the suite's tests, run here)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    backend: KeyStore
    if request.param == "memory":
        backend = MemoryKeyStore()
    elif request.param == "sqlite":
        backend = SqliteKeyStore.in_folder(tmp_path)
    else:
        backend = PostgresKeyStore(request.getfixturevalue("postgres_server").new_database())
    await backend.open()
    yield backend
    await backend.close()
