"""Server processes for the benchmarks."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

READY = re.compile(rb"serving on (\S+)")
SERVE = (sys.executable, "-m", "tierstack.cli", "serve")


@dataclass(frozen=True)
class Tiers:
    """Execute and Orchestrate, served by processes of their own, and where they serve."""

    execute: asyncio.subprocess.Process
    orchestrate: asyncio.subprocess.Process
    execute_target: str
    orchestrate_target: str


@asynccontextmanager
async def tiers_2_and_3(data_dir: Path, *, logs: Path | None = None) -> AsyncIterator[Tiers]:
    """Serves Execute and Orchestrate (SQLite in ``data_dir``) on free ports for the block; their logs
    go to the folder ``logs`` when given."""
    free = ("--port", "0", "--metrics-port", "0")
    async with (
        serving(
            *SERVE, "execute", *free, "--data-dir", str(data_dir / "execute"), log=logs and logs / "execute.log"
        ) as (execute_target, execute),
        serving(
            *SERVE,
            "orchestrate",
            *free,
            "--data-dir",
            str(data_dir / "orchestrate"),
            "--execute-target",
            execute_target,
            log=logs and logs / "orchestrate.log",
        ) as (orchestrate_target, orchestrate),
    ):
        yield Tiers(execute, orchestrate, execute_target, orchestrate_target)


@asynccontextmanager
async def serving(
    *command: str, env: Mapping[str, str] | None = None, log: Path | None = None
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Runs a server process (with ``env`` added to the environment) for the block and yields the
    address it reports and the process; its log goes to ``log`` when given."""
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    assert process.stderr is not None
    target = ""
    first: list[bytes] = []  # the lines up to the one that says where it serves, for the log
    async for line in process.stderr:
        first.append(line)
        match = READY.search(line)
        if match:
            target = match.group(1).decode()
            break
    drain = asyncio.create_task(_drain(process.stderr, log, first))  # keeps the pipe from filling up
    try:
        if not target:
            raise RuntimeError(f"{command} exited before serving")
        yield target, process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await drain


async def _drain(stream: asyncio.StreamReader, log: Path | None, first: list[bytes]) -> None:
    """Reads ``stream`` to its end, into ``log`` (after the ``first`` lines read already) when given."""
    if log is None:
        await stream.read()
        return
    with log.open("wb") as written:
        written.writelines(first)
        while chunk := await stream.read(1 << 16):
            written.write(chunk)
