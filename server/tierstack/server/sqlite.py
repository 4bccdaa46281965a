"""The one way a tier opens its SQLite file: WAL, synchronous=NORMAL, its schema in place."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite


async def connect(path: Path, schema: str) -> aiosqlite.Connection:
    """Opens (creating it and its folder when missing) the SQLite file at ``path``, in write-ahead
    log mode with commits that survive a crash of the process, and applies ``schema`` (idempotent
    statements) before returning the connection."""
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(schema)
        await db.commit()
    except BaseException:
        await db.close()
        raise
    return db
