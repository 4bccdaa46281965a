"""The stores that ``Settings.store_url`` names, for the commands that manage them."""

from __future__ import annotations

from tierstack.server import postgres
from tierstack.server.config import Settings
from tierstack.server.coordinate.store import SqliteGoalStore
from tierstack.server.execute.store import SqliteExecutionStore
from tierstack.server.orchestrate.store import SqliteRunStore


async def migrate(settings: Settings) -> str:
    """Brings the schema of the stores up to date and says where they are and at which version."""
    if settings.postgres_url:
        pool = await postgres.connect(settings.postgres_url, max_size=1)
        try:
            version = await pool.fetchval("SELECT MAX(version) FROM tierstack_schema")
        finally:
            await pool.close()
        return f"PostgreSQL store at schema version {version}"
    folder = settings.sqlite_dir
    for store in (
        SqliteRunStore.in_folder(folder),
        SqliteGoalStore.in_folder(folder),
        SqliteExecutionStore.in_folder(folder),
    ):
        await store.open()
        await store.close()
    return f"SQLite stores in {folder} are up to date"
