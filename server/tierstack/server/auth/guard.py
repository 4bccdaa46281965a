"""Who calls, and whether they may: the credential in a call's metadata checked against the key
store, the role each RPC needs, and the caller a tier acts for on its calls to the tier below."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cachetools

from tierstack.core.errors import PermissionDeniedError, UnauthenticatedError
from tierstack.server.auth.keys import ApiKey, KeyStore, Role, matches, parse
from tierstack.server.auth.principal import MAX_NAME, Principal, act_as, current
from tierstack.server.auth.quota import RateLimiter
from tierstack.server.auth.tokens import TokenVerifier

#: Metadata keys: the credential, and who a tier calls for.
AUTHORIZATION = "authorization"
TENANT = "x-tierstack-tenant"
CALLER = "x-tierstack-caller"

_SERVICES = "/tierstack.v1."
#: What grpcurl lists and describes services through.
REFLECTION = frozenset(
    {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
#: The role each RPC needs; an RPC not named here needs ADMIN (a new RPC is closed until named).
REQUIRED: dict[str, Role] = {
    **{
        f"{_SERVICES}CoordinatorService/{name}": Role.READ for name in ("GetGoal", "WatchGoal", "ListGoals", "FormTeam")
    },
    **{
        f"{_SERVICES}CoordinatorService/{name}": Role.RUN
        for name in ("Coordinate", "StartGoal", "CancelGoal", "DecomposeGoal")
    },
    **{
        f"{_SERVICES}OrchestratorService/{name}": Role.READ
        for name in ("WatchRun", "GetRun", "ListRuns", "ResolveVariables", "PlanWorkflow", "ValidateWorkflow")
    },
    **{
        f"{_SERVICES}OrchestratorService/{name}": Role.RUN
        for name in ("Orchestrate", "StartRun", "CancelRun", "DeleteRun", "PauseRun", "ResumeRun")
    },
    f"{_SERVICES}ExecutorService/ListTools": Role.READ,
    **{
        f"{_SERVICES}ExecutorService/{name}": Role.RUN
        for name in ("Execute", "CancelExecution", "ExecuteTool", "ExecuteTools", "ApproveToolCall", "RejectToolCall")
    },
    # They carry many callers' calls, each naming its own: the tiers' path only.
    f"{_SERVICES}ExecutorService/ExecuteStream": Role.TIER,
    f"{_SERVICES}OrchestratorService/WatchRuns": Role.TIER,
    **dict.fromkeys(REFLECTION, Role.READ),
    # Every tenant's figures (a tool's last error quotes a call's arguments): these are for operators.
    **{
        f"{_SERVICES}MonitorService/{name}": Role.ADMIN
        for name in ("GetMetrics", "WatchMetrics", "WatchAlerts", "GetRecommendations")
    },
    f"{_SERVICES}ExecutorService/GetToolStats": Role.ADMIN,
}
#: Load balancers and orchestrators probe health without a credential.
OPEN = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


#: Stands for a key the cache does not hold (None is a key the store does not know).
_UNREAD: Any = object()


def on_behalf(principal: Principal | None, tier_key: str) -> list[tuple[str, str]]:
    """Returns the metadata of a call to the tier below: the tier's key, and who it calls for."""
    metadata = [(AUTHORIZATION, f"Bearer {tier_key}")]
    if principal is not None:
        metadata += [(TENANT, principal.tenant), (CALLER, principal.subject)]
    return metadata


class Guard:
    """Checks each call's credential (``authorization: Bearer …``: an API key ``tsk_…``, or a JSON Web
    Token when ``tokens`` is given) and the role its RPC needs. A key of the TIER role (a tier calling
    the tier below) acts for the tenant and caller its call names.

    Args:
        keys: The store of API keys, opened and closed with the guard.
        tokens: Verifies JSON Web Tokens, opened and closed with the guard; None accepts keys alone.
        limiter: Holds each tenant to its calls a second (not the tiers' own calls for it); None
            leaves them unlimited.
        open_reflection: Lets anyone list and describe the services (grpcurl); else it needs a key.
        cache_seconds: How long a key read from the store is trusted before it is read again: a
            revoked key stops working within this. 0 reads the store on every call.
        cache_entries: The most keys remembered (known or not).
    """

    def __init__(
        self,
        keys: KeyStore,
        *,
        tokens: TokenVerifier | None = None,
        limiter: RateLimiter | None = None,
        open_reflection: bool = False,
        cache_seconds: float = 5.0,
        cache_entries: int = 10_000,
    ) -> None:
        self._keys = keys
        self._tokens = tokens
        self._limiter = limiter
        self._open = OPEN | REFLECTION if open_reflection else OPEN
        self._cache: cachetools.TTLCache[str, tuple[ApiKey, bytes] | None] | None = (
            cachetools.TTLCache(cache_entries, cache_seconds) if cache_seconds > 0 else None
        )

    async def open(self) -> None:
        await self._keys.open()
        if self._tokens is not None:
            await self._tokens.open()

    async def close(self) -> None:
        if self._tokens is not None:
            await self._tokens.close()
        await self._keys.close()

    async def authenticate(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """Makes who calls ``method`` current for the call (see :func:`principal.current`), unless
        the method is open to all; done before the request is read, so a caller without a credential
        costs no parsing.

        Raises:
            UnauthenticatedError: No credential, or one that is not a live key or a valid token.
            ResourceExhaustedError: The tenant made more calls a second than it may.
        """
        if method in self._open:
            return
        values = dict(metadata or ())
        credential = values.get(AUTHORIZATION)
        if not isinstance(credential, str) or not credential.startswith("Bearer "):
            raise UnauthenticatedError(
                "this call needs a credential: authorization: Bearer <key>", reason="NO_CREDENTIAL"
            )
        principal = await self._principal(credential.removeprefix("Bearer ").strip())
        if principal is None:
            raise UnauthenticatedError("the credential is not a valid key or token", reason="BAD_CREDENTIAL")
        act_as(principal)  # a call refused from here on is still logged as its caller's
        if principal.role is Role.TIER:
            self.act_for(values.get(TENANT), values.get(CALLER, ""))
        elif self._limiter is not None:
            self._limiter.take(principal.tenant)

    def act_for(self, tenant: object, caller: object) -> None:
        """Makes the tenant and caller a tier names (in a call's metadata, or in each call a stream
        carries) current for the call, when the current caller is a tier; anyone else calls for itself."""
        principal = current()
        if principal is None or principal.role is not Role.TIER:
            return
        if isinstance(tenant, str) and isinstance(caller, str) and 0 < len(tenant) <= MAX_NAME >= len(caller):
            act_as(Principal(tenant, caller, Role.TIER))

    def authorize(self, method: str) -> None:
        """Checks that the current caller (see :meth:`authenticate`) may call ``method``.

        Raises:
            PermissionDeniedError: The credential's role may not call ``method``.
        """
        if method in self._open:
            return
        principal = current()
        if principal is None:  # not authenticated: fails closed
            raise UnauthenticatedError("this call needs a credential", reason="NO_CREDENTIAL")
        needed = REQUIRED.get(method, Role.ADMIN)
        if principal.role < needed:
            raise PermissionDeniedError(
                f"the {principal.role.name.lower()} role may not call {method.rpartition('/')[2][:64]}",
                reason="ROLE_TOO_LOW",
            )

    async def _principal(self, credential: str) -> Principal | None:
        """Returns who a credential is: an API key's tenant and role, or a token's; None if neither."""
        if credential.startswith("tsk_") or self._tokens is None:
            key = await self._key(credential)
            return None if key is None else Principal(key.tenant, key.key_id, key.role)
        return await self._tokens.principal(credential)

    async def _key(self, token: str) -> ApiKey | None:
        """Returns the live key ``token`` is, else None."""
        parsed = parse(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        found: tuple[ApiKey, bytes] | None = self._cache.get(key_id, _UNREAD) if self._cache is not None else _UNREAD
        if found is _UNREAD:
            found = await self._keys.find(key_id)
            if self._cache is not None:
                self._cache[key_id] = found
        if found is None or found[0].revoked or not matches(secret, found[1]):
            return None
        return found[0]
