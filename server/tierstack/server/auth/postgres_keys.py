"""API keys in PostgreSQL (asyncpg), shared by every replica of every tier."""

from __future__ import annotations

from tierstack.server import postgres
from tierstack.server.auth.keys import COLUMNS, MAX_LISTED, ApiKey, Issued, KeyStore, key_of_row


class PostgresKeyStore(postgres.Pooled, KeyStore):
    """Keeps API keys in a PostgreSQL database.

    Args:
        url: The database's ``postgresql://`` URL; its schema is migrated when the store opens.
    """

    async def add(self, issued: Issued) -> None:
        key = issued.key
        await self._db.execute(
            f"INSERT INTO api_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, false, $6)",
            key.key_id,
            key.tenant,
            int(key.role),
            key.name,
            key.create_ns,
            issued.digest,
        )

    async def find(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        row = await self._db.fetchrow(f"SELECT {COLUMNS} FROM api_keys WHERE key_id = $1", key_id)
        return None if row is None else key_of_row(tuple(row))

    async def keys(self, *, after: str = "", limit: int = MAX_LISTED) -> list[ApiKey]:
        query = f"SELECT {COLUMNS} FROM api_keys WHERE key_id > $1 ORDER BY key_id LIMIT $2"
        return [key_of_row(tuple(row))[0] for row in await self._db.fetch(query, after, min(limit, MAX_LISTED))]

    async def revoke(self, key_id: str) -> bool:
        done = await self._db.execute("UPDATE api_keys SET revoked = true WHERE key_id = $1 AND NOT revoked", key_id)
        return bool(done == "UPDATE 1")
