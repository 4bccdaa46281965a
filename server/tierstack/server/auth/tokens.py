"""JSON Web Tokens as credentials: signed by a key of a JWKS that an identity provider serves, for one
issuer and audience, naming the tenant and role in claims (joserfc verifies them)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import cachetools
import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from tierstack.server.auth.keys import Role
from tierstack.server.auth.principal import MAX_NAME, Principal

_log = logging.getLogger(__name__)

#: The longest token read; a longer one is refused unread.
MAX_TOKEN = 8 << 10
#: The signatures accepted (asymmetric only: the JWKS is public).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
#: The roles a token may claim (the TIER role is for the tiers' own keys).
ROLES = {"read": Role.READ, "run": Role.RUN, "admin": Role.ADMIN}


class TokenVerifier:
    """Verifies tokens against the JWKS at ``url``, read at start and again (at most every
    ``refresh_seconds``) when a token does not verify: the provider may have rotated its keys.

    Args:
        url: Where the identity provider serves its JWKS.
        issuer: The ``iss`` every token must have.
        audience: The ``aud`` every token must have (this deployment).
        tenant_claim: The claim that names the tenant.
        role_claim: The claim that names the role (``read``, ``run`` or ``admin``).
        refresh_seconds: How often at most the JWKS is read again.
        cache_entries: The most verified tokens remembered (until they expire, a minute at most).
    """

    def __init__(
        self,
        url: str,
        *,
        issuer: str,
        audience: str,
        tenant_claim: str = "tenant",
        role_claim: str = "role",
        refresh_seconds: float = 30.0,
        cache_entries: int = 10_000,
    ) -> None:
        self._refresh_seconds = refresh_seconds
        self._url = url
        self._claims = jwt.JWTClaimsRegistry(
            exp={"essential": True},
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            sub={"essential": True},
        )
        self._tenant_claim = tenant_claim
        self._role_claim = role_claim
        self._keys = KeySet([])
        self._read_at = -refresh_seconds
        self._reading = asyncio.Lock()
        self._http: httpx.AsyncClient | None = None
        self._verified: cachetools.TTLCache[str, Principal] = cachetools.TTLCache(cache_entries, 60.0)

    async def open(self) -> None:
        self._http = httpx.AsyncClient(timeout=5.0, follow_redirects=False, trust_env=False)
        await self._refresh()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _refresh(self) -> None:
        """Reads the JWKS again, unless it was read less than ``refresh_seconds`` ago."""
        async with self._reading:
            if time.monotonic() - self._read_at < self._refresh_seconds or self._http is None:
                return
            self._read_at = time.monotonic()
            try:
                response = await self._http.get(self._url)
                response.raise_for_status()
                self._keys = KeySet.import_key_set(response.json())
            except (httpx.HTTPError, ValueError, JoseError) as exc:
                _log.warning("cannot read the JWKS (%s); tokens signed by keys not yet read are refused", exc)

    async def principal(self, token: str) -> Principal | None:
        """Returns who a valid token is for, else None."""
        if len(token) > MAX_TOKEN:
            return None
        known = self._verified.get(token)
        if known is not None:
            return known
        decoded = self._decode(token)
        if decoded is None:
            await self._refresh()  # the provider may have rotated its keys
            decoded = self._decode(token)
        if decoded is None:
            return None
        claims = decoded.claims
        tenant, role = claims.get(self._tenant_claim), ROLES.get(str(claims.get(self._role_claim)))
        subject = claims.get("sub")
        if not (isinstance(tenant, str) and 0 < len(tenant) <= MAX_NAME and role and isinstance(subject, str)):
            return None
        principal = Principal(tenant, subject[:MAX_NAME], role)
        expires = float(claims["exp"]) - time.time()
        if expires > 60:  # remembered a minute at most, never past its expiry
            self._verified[token] = principal
        return principal

    def _decode(self, token: str) -> Any:
        """Returns the verified token with valid claims, else None."""
        try:
            decoded = jwt.decode(token, self._keys, algorithms=ALGORITHMS)
            self._claims.validate(decoded.claims)
        except (JoseError, ValueError, TypeError):
            return None
        return decoded
