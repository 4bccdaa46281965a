"""Quotas per tenant: requests per second (a token bucket for each, in a bounded map) and unfinished work."""

from __future__ import annotations

import time

import cachetools

from tierstack.core.errors import ResourceExhaustedError, Violation


class RateLimiter:
    """Lets each tenant make ``rate`` calls a second on this server, in bursts of up to ``rate``
    (one second's worth, at least one call).

    Args:
        rate: Calls a second per tenant.
        tenants: The most tenants tracked at once (those quiet longest are forgotten, with a full bucket).
    """

    def __init__(self, rate: float, *, tenants: int = 10_000) -> None:
        self._rate = rate
        self._burst = max(rate, 1.0)
        self._buckets: cachetools.LRUCache[str, tuple[float, float]] = cachetools.LRUCache(tenants)

    def take(self, tenant: str) -> None:
        """Takes one call from ``tenant``'s bucket.

        Raises:
            ResourceExhaustedError: The bucket is empty; ``retry_after`` says when it holds a call again.
        """
        now = time.monotonic()
        tokens, then = self._buckets.get(tenant, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens < 1:
            self._buckets[tenant] = (tokens, now)
            raise ResourceExhaustedError(
                [Violation("requests_per_second", f"a tenant may make {self._rate:g} calls a second here")],
                reason="RATE_LIMITED",
                retry_after=(1 - tokens) / self._rate,
            )
        self._buckets[tenant] = (tokens - 1, now)


#: When a caller refused for too much unfinished work is told to try again: work ends at its own pace.
RETRY_UNFINISHED_SECONDS = 1.0


def too_many_unfinished(kind: str, limit: int) -> ResourceExhaustedError:
    """Returns the error of a tenant that has ``limit`` unfinished ``kind`` (``runs``, ``goals``) already."""
    return ResourceExhaustedError(
        [Violation(f"concurrent_{kind}", f"a tenant may have {limit} unfinished {kind} at once")],
        reason=f"TOO_MANY_{kind.upper()}",
        retry_after=RETRY_UNFINISHED_SECONDS,
    )
