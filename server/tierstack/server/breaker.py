"""A circuit breaker: stops calling a service that keeps failing, and probes it again after a pause.

As the seed's resilience design has it: a breaker opens after ``threshold`` failures within
``window_seconds``; while open it refuses every call; after ``reset_seconds`` it is half-open and
lets one probe through at a time; ``successes`` probes in a row that work close it, and a probe that
fails opens it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cachetools import LRUCache


class BreakerState(Enum):
    """Where a breaker stands."""

    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused until the pause ends
    HALF_OPEN = "half_open"  # one probe at a time goes through; enough successes close the breaker


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a breaker opens and closes.

    Attributes:
        threshold: How many failures within the window open the breaker.
        window_seconds: How far back failures count.
        reset_seconds: How long it stays open before a probe (and how long a probe that never
            reports holds the next one back).
        successes: How many probes in a row must work to close it.
    """

    threshold: int = 5
    window_seconds: float = 60.0
    reset_seconds: float = 30.0
    successes: int = 2


class CircuitBreaker:
    """Opens after ``threshold`` failures within ``window_seconds``; after ``reset_seconds`` lets one
    probe through at a time, and closes after ``successes`` of them in a row work.

    Args:
        policy: The thresholds and pauses.
        clock: Returns the time in seconds (monotonic).
    """

    def __init__(self, policy: BreakerPolicy = BreakerPolicy(), *, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = max(policy.threshold, 1)
        self._window = policy.window_seconds
        self._reset = policy.reset_seconds
        self._successes = max(policy.successes, 1)
        self._clock = clock
        self._failures: deque[float] = deque()
        self._since = 0.0  # when it opened, or when the probe in flight went through
        self._probing = False
        self._worked = 0  # probes in a row that worked
        self._state = BreakerState.CLOSED

    @property
    def state(self) -> BreakerState:
        """Where the breaker stands."""
        return self._state

    def allow(self) -> bool:
        """Says whether a call may go through now (after the pause, as the one probe in flight)."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if now - self._since < self._reset and (self._state is BreakerState.OPEN or self._probing):
            return False
        self._state = BreakerState.HALF_OPEN
        self._probing, self._since = True, now
        return True

    def succeeded(self) -> None:
        """Records a call that worked; enough probes in a row that worked close the breaker."""
        if self._state is not BreakerState.HALF_OPEN:
            return
        self._probing = False
        self._worked += 1
        if self._worked >= self._successes:
            self._state, self._worked = BreakerState.CLOSED, 0
            self._failures.clear()

    def failed(self) -> None:
        """Records a call that failed: a failed probe, or one failure too many within the window,
        opens the breaker."""
        now = self._clock()
        if self._state is BreakerState.OPEN:
            return  # a call let through before it opened: the pause runs from the opening
        if self._state is BreakerState.CLOSED:
            self._failures.append(now)
            while self._failures and self._failures[0] <= now - self._window:
                self._failures.popleft()
            if len(self._failures) < self._threshold:
                return
        self._state, self._since, self._probing, self._worked = BreakerState.OPEN, now, False, 0
        self._failures.clear()


class Breakers:
    """A breaker per service and operation, made on first use; the most recently used ``kept`` are
    kept (callers name some of them: hosts, models).

    Args:
        policy: Every breaker's.
        kept: How many breakers are kept.
    """

    def __init__(self, policy: BreakerPolicy = BreakerPolicy(), *, kept: int = 1_000) -> None:
        self._policy = policy
        self._breakers: LRUCache[str, CircuitBreaker] = LRUCache(kept)

    def of(self, name: str) -> CircuitBreaker:
        """Returns the breaker of ``name``."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = CircuitBreaker(self._policy)
        return breaker

    def states(self) -> dict[str, str]:
        """Returns each breaker's state by name."""
        return {name: breaker.state.value for name, breaker in self._breakers.items()}
