"""API keys: what a caller presents (``tsk_<id>_<secret>``), and the store that keeps each key's
tenant and role with a digest of its secret, never the secret itself (memory, SQLite; PostgreSQL in
:mod:`tierstack.server.auth.postgres_keys`)."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import aiosqlite

from tierstack.server import sqlite

#: What a key looks like: a prefix, an id (what the store looks up) and a secret.
_TOKEN = re.compile(r"tsk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
#: The most keys one listing returns.
MAX_LISTED = 1000


class Role(enum.IntEnum):
    """What a credential may do; each role may do what the ones below it may."""

    #: Get, list and watch.
    READ = 1
    #: Also start, cancel, pause, resume, approve, and call tools.
    RUN = 2
    #: Also every tenant's metrics and alerts.
    ADMIN = 3
    #: A tier calling the tier below: may do anything, on behalf of the caller it names.
    TIER = 4


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as the store keeps it: all but its secret."""

    key_id: str
    tenant: str
    role: Role
    name: str
    create_ns: int
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Issued:
    """A key just made: what the store keeps, and the token, shown this once."""

    key: ApiKey
    token: str
    digest: bytes


def issue(tenant: str, role: Role, name: str = "") -> Issued:
    """Makes a new key for ``tenant`` with ``role``."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    key = ApiKey(key_id=key_id, tenant=tenant, role=role, name=name, create_ns=time.time_ns())
    return Issued(key, f"tsk_{key_id}_{secret}", digest(secret))


def digest(secret: str) -> bytes:
    """The digest a key's secret is kept as (the secret is random, so one SHA-256 suffices)."""
    return hashlib.sha256(secret.encode()).digest()


def parse(token: str) -> tuple[str, str] | None:
    """Returns the id and secret of a token shaped like a key, else None."""
    found = _TOKEN.fullmatch(token)
    return (found[1], found[2]) if found else None


def matches(secret: str, kept: bytes) -> bool:
    """Whether ``secret`` is the one whose digest is ``kept``, in constant time."""
    return hmac.compare_digest(digest(secret), kept)


class KeyStore(ABC):
    """Where API keys are kept; every tier of a deployment reads the same one."""

    @abstractmethod
    async def open(self) -> None:
        """Opens the store."""

    @abstractmethod
    async def close(self) -> None:
        """Closes the store."""

    @abstractmethod
    async def add(self, issued: Issued) -> None:
        """Keeps a new key (its digest, not its token)."""

    @abstractmethod
    async def find(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        """Returns the key with ``key_id`` and its secret's digest, revoked or not; None if unknown."""

    @abstractmethod
    async def keys(self, *, after: str = "", limit: int = MAX_LISTED) -> list[ApiKey]:
        """Returns up to ``limit`` keys by id, from the first after ``after``."""

    @abstractmethod
    async def revoke(self, key_id: str) -> bool:
        """Revokes a key; False if it is unknown or was revoked already."""


class MemoryKeyStore(KeyStore):
    """Keeps keys in this process (tests, and a server without a key store of its own)."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[ApiKey, bytes]] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def add(self, issued: Issued) -> None:
        self._keys[issued.key.key_id] = (issued.key, issued.digest)

    async def find(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        return self._keys.get(key_id)

    async def keys(self, *, after: str = "", limit: int = MAX_LISTED) -> list[ApiKey]:
        return [key for key_id, (key, _) in sorted(self._keys.items()) if key_id > after][: min(limit, MAX_LISTED)]

    async def revoke(self, key_id: str) -> bool:
        found = self._keys.get(key_id)
        if found is None or found[0].revoked:
            return False
        self._keys[key_id] = (replace(found[0], revoked=True), found[1])
        return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    role INTEGER NOT NULL,
    name TEXT NOT NULL,
    create_ns INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    digest BLOB NOT NULL
);
"""
#: The columns that make an :class:`ApiKey` and its digest, in the order :func:`key_of_row` reads.
COLUMNS = "key_id, tenant, role, name, create_ns, revoked, digest"


def key_of_row(row: tuple[object, ...] | aiosqlite.Row) -> tuple[ApiKey, bytes]:
    key_id, tenant, role, name, create_ns, revoked, kept = tuple(row)
    key = ApiKey(
        key_id=str(key_id),
        tenant=str(tenant),
        role=Role(int(str(role))),
        name=str(name),
        create_ns=int(str(create_ns)),
        revoked=bool(revoked),
    )
    return key, bytes(kept)


class SqliteKeyStore(KeyStore):
    """Keeps keys in one SQLite file beside the other SQLite stores, which the three tiers share.

    Args:
        path: The database file; its folder is created when missing.
    """

    #: The store's file in the folder of the SQLite stores.
    FILE = "keys.sqlite3"

    @classmethod
    def in_folder(cls, folder: Path) -> SqliteKeyStore:
        """Returns the store of its file in ``folder``."""
        return cls(folder / cls.FILE)

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the key store is not open")
        return self._db

    async def open(self) -> None:
        self._db, _ = await sqlite.connect(self._path, _SCHEMA)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def add(self, issued: Issued) -> None:
        key = issued.key
        await self._conn.execute(
            f"INSERT INTO api_keys ({COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, ?)",
            (key.key_id, key.tenant, int(key.role), key.name, key.create_ns, issued.digest),
        )
        await self._conn.commit()

    async def find(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        async with self._conn.execute(f"SELECT {COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)) as rows:
            row = await rows.fetchone()
        return None if row is None else key_of_row(row)

    async def keys(self, *, after: str = "", limit: int = MAX_LISTED) -> list[ApiKey]:
        query = f"SELECT {COLUMNS} FROM api_keys WHERE key_id > ? ORDER BY key_id LIMIT ?"
        async with self._conn.execute(query, (after, min(limit, MAX_LISTED))) as rows:
            return [key_of_row(row)[0] for row in await rows.fetchall()]

    async def revoke(self, key_id: str) -> bool:
        cursor = await self._conn.execute("UPDATE api_keys SET revoked = 1 WHERE key_id = ? AND revoked = 0", (key_id,))
        await self._conn.commit()
        return cursor.rowcount == 1
