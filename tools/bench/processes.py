"""Server processes for the benchmarks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

READY = re.compile(rb"serving on (\S+)")


@asynccontextmanager
async def serving(*command: str) -> AsyncIterator[str]:
    """Runs a server process for the block and yields the address it reports."""
    process = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
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
        yield target
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await drain
