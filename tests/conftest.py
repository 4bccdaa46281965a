"""Fixtures that start real tierstack servers on 127.0.0.1, port 0, and real HTTP servers for tools."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import HttpServer, Stack, free_port, open_stack
from tierstack.server import Settings
from tools.postgres import LocalPostgres


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def stack(data_dir: Path) -> AsyncIterator[Stack]:
    async with open_stack(Settings(data_dir=data_dir)) as opened:
        yield opened


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """A real PostgreSQL server of the test session's own (started on first use); each test that
    needs a database asks it for an empty one (``new_database()``)."""
    with LocalPostgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Where a test's tiers keep runs, goals and executions (``TIERSTACK_STORE_URL``): SQLite in their
    data folder, or an empty PostgreSQL database of the session's server."""
    return "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_server").new_database())


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real redis-server on 127.0.0.1 and a free port, without persistence; yields its URL and process."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
    try:
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.terminate()
        process.wait(timeout=10)
