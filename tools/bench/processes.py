"""Server processes for the benchmarks."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

READY = re.compile(rb"serving on (\S+)")


@asynccontextmanager
async def serving(
    *command: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Runs a server process (with ``env`` added to the environment) for the block and yields the
    address it reports and the process."""
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    assert process.stderr is not None
    target = ""
    async for line in process.stderr:
        match = READY.search(line)
        if match:
            target = match.group(1).decode()
            break
    drain = asyncio.create_task(process.stderr.read())  # keeps the pipe from filling up
    try:
        if not target:
            raise RuntimeError(f"{command} exited before serving")
        yield target, process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await drain
