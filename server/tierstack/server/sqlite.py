"""The one way a tier opens its SQLite file: WAL, synchronous=NORMAL, its schema in place and migrated."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import aiosqlite


async def connect(path: Path, schema: str, migrations: Sequence[str] = ()) -> tuple[aiosqlite.Connection, int]:
    """Opens (creating it and its folder when missing) the SQLite file at ``path``, in write-ahead
    log mode with commits that survive a crash of the process, applies ``schema`` (idempotent
    statements, the first version) and the numbered ``migrations`` it lacks (``PRAGMA user_version``
    counts those applied, each applied with its number in one transaction), and returns the
    connection and the version the file had."""
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(schema)
        await db.commit()
        async with db.execute("PRAGMA user_version") as rows:
            row = await rows.fetchone()
        version = row[0] if row else 0
        for number, script in enumerate(migrations[version:], start=version + 1):
            await db.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")
    except BaseException:
        await db.close()
        raise
    return db, version
