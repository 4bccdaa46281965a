"""The model response cache: L1 in process memory (a bounded LRU), L2 in Redis when configured.

Both levels are aiocache caches. Keys hash everything that shapes an answer (model, messages, tools,
token limit, temperature). A Redis outage never fails a request: the cache carries on with L1 alone
and tries Redis again after a pause.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from aiocache import RedisCache, SimpleMemoryCache

from tierstack.server.ai.models import Completion, CompletionRequest, ToolCallRequest, Usage

_log = logging.getLogger(__name__)

#: How long the cache leaves Redis alone after it failed.
L2_RETRY_SECONDS = 5.0


def request_key(request: CompletionRequest) -> str:
    """Returns the cache key of a request: a SHA-256 of what shapes the answer and of its tenant (a
    tenant answered from another's call would learn what that one asked), not of the rest of its scope."""
    shape = {
        "tenant": request.scope.tenant,
        "model": request.model,
        "messages": [dataclasses.asdict(message) for message in request.messages],
        "tools": [[tool.name, tool.description, tool.parameters] for tool in request.tools],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    canonical = json.dumps(shape, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _dump(answer: Completion) -> dict[str, Any]:
    return {
        "content": answer.content,
        "model": answer.model,
        "tool_calls": [[call.id, call.name, call.arguments] for call in answer.tool_calls],
        "usage": [answer.usage.prompt_tokens, answer.usage.completion_tokens],
    }


def _load(stored: dict[str, Any]) -> Completion:
    return Completion(
        stored["content"],
        stored["model"],
        tuple(ToolCallRequest(i, name, arguments) for i, name, arguments in stored["tool_calls"]),
        Usage(*stored["usage"]),
        cached=True,
    )


class LruMemoryCache(SimpleMemoryCache):  # type: ignore[misc]  # aiocache has no type hints
    """aiocache's memory backend, bounded: beyond ``max_entries`` the least recently used go."""

    def __init__(self, *, max_entries: int, **options: Any) -> None:
        super().__init__(**options)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._max_entries = max_entries

    async def _get(self, key: str, encoding: str = "utf-8", _conn: Any = None) -> Any:
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    async def _set(self, key: str, value: Any, ttl: Any = None, _cas_token: Any = None, _conn: Any = None) -> Any:
        stored = await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        if key in self._cache:
            self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            await self._delete(next(iter(self._cache)))
        return stored

    def __len__(self) -> int:
        return len(self._cache)


@dataclasses.dataclass(slots=True)
class CacheStats:
    """What the cache did since the server started."""

    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    l2_errors: int = 0

    @property
    def lookups(self) -> int:
        """Returns how many answers were looked up, found or not."""
        return self.l1_hits + self.l2_hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Returns the share of lookups answered from either level."""
        return (self.l1_hits + self.l2_hits) / self.lookups if self.lookups else 0.0


class ResponseCache:
    """Answers a request seen before without asking a model.

    Args:
        max_entries: How many answers L1 keeps.
        ttl_seconds: How long an answer is kept, in both levels.
        redis_url: ``redis://host:port/db`` for L2; empty keeps L1 alone.
        l2_timeout: How long one Redis operation may take before it counts as an outage.
    """

    def __init__(
        self, *, max_entries: int = 4096, ttl_seconds: float = 3600.0, redis_url: str = "", l2_timeout: float = 0.5
    ) -> None:
        self._l1 = LruMemoryCache(max_entries=max_entries, ttl=ttl_seconds)
        self._l2: Any = None
        if redis_url:
            parts = urlsplit(redis_url)
            self._l2 = RedisCache(
                endpoint=parts.hostname or "127.0.0.1",
                port=parts.port or 6379,
                db=int(parts.path.strip("/") or 0),
                password=parts.password,
                namespace="tierstack:model",
                timeout=l2_timeout,
                create_connection_timeout=l2_timeout,
                ttl=ttl_seconds,
            )
        self._l2_down_until = 0.0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._l1)

    async def get(self, key: str) -> Completion | None:
        """Returns the cached answer for ``key``, L1 first; an answer found in L2 is copied to L1."""
        stored = await self._l1.get(key)
        if stored is not None:
            self.stats.l1_hits += 1
            return _load(stored)
        stored = await self._l2_call("get", key)
        if stored is not None:
            self.stats.l2_hits += 1
            await self._l1.set(key, stored)
            return _load(stored)
        self.stats.misses += 1
        return None

    async def set(self, key: str, answer: Completion) -> None:
        """Keeps ``answer`` in both levels."""
        stored = _dump(answer)
        await self._l1.set(key, stored)
        await self._l2_call("set", key, stored)

    async def _l2_call(self, operation: str, *arguments: Any) -> Any:
        if self._l2 is None or time.monotonic() < self._l2_down_until:
            return None
        try:
            return await getattr(self._l2, operation)(*arguments)
        except Exception as exc:  # any Redis failure: carry on with L1 for a while
            self.stats.l2_errors += 1
            self._l2_down_until = time.monotonic() + L2_RETRY_SECONDS
            _log.warning("model cache: Redis failed (%s); using memory alone for %.0f s", exc, L2_RETRY_SECONDS)
            return None

    async def close(self) -> None:
        """Closes the Redis connections."""
        if self._l2 is not None:
            await self._l2.client.aclose()  # aiocache's close() calls redis-py's deprecated close()
