"""Authentication: API keys in the store, the guard that checks every call's credential and role,
and the caller a tier acts for on its calls below."""

from __future__ import annotations

from tierstack.server.auth.guard import Guard
from tierstack.server.auth.keys import ApiKey, KeyStore, MemoryKeyStore, Role, SqliteKeyStore, issue
from tierstack.server.auth.principal import Principal, current
from tierstack.server.auth.quota import RateLimiter
from tierstack.server.auth.tokens import TokenVerifier
from tierstack.server.config import Settings

__all__ = [
    "ApiKey",
    "Guard",
    "KeyStore",
    "MemoryKeyStore",
    "Principal",
    "Role",
    "SqliteKeyStore",
    "TokenVerifier",
    "current",
    "guard_for",
    "issue",
    "key_store",
]


def key_store(settings: Settings) -> KeyStore:
    """Returns the key store that ``settings.store_url`` names (not yet open)."""
    if settings.postgres_url:
        from tierstack.server.auth.postgres_keys import PostgresKeyStore

        return PostgresKeyStore(settings.postgres_url)
    return SqliteKeyStore.in_folder(settings.sqlite_dir)


def guard_for(settings: Settings) -> Guard | None:
    """Returns the guard of a server with ``settings`` (not yet open), or None when auth is off."""
    if not settings.auth:
        return None
    tokens = (
        TokenVerifier(
            settings.jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            refresh_seconds=settings.jwks_refresh_seconds,
        )
        if settings.jwks_url
        else None
    )
    return Guard(
        key_store(settings),
        tokens=tokens,
        limiter=RateLimiter(settings.tenant_requests_per_second) if settings.tenant_requests_per_second else None,
        open_reflection=settings.open_reflection,
        cache_seconds=settings.auth_cache_seconds,
    )
