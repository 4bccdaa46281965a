"""A circuit breaker: stops calling a model that keeps failing, and probes it again after a pause."""

from __future__ import annotations

import time
from enum import Enum


class BreakerState(Enum):
    """Where a breaker stands."""

    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused until the pause ends
    HALF_OPEN = "half_open"  # one probe call goes through; its outcome closes or reopens the breaker


class CircuitBreaker:
    """Opens after ``threshold`` failures in a row; after ``reset_seconds`` lets one probe through.

    Args:
        threshold: How many failures in a row open the breaker.
        reset_seconds: How long it stays open before a probe.
    """

    def __init__(self, *, threshold: int = 5, reset_seconds: float = 30.0) -> None:
        self._threshold = threshold
        self._reset_seconds = reset_seconds
        self._failures = 0
        self._opened_at = 0.0
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """Says whether a call may go through now (and, after the pause, lets one probe through)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and time.monotonic() - self._opened_at >= self._reset_seconds:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def succeeded(self) -> None:
        """Records a call that worked: the breaker closes."""
        self._failures = 0
        self.state = BreakerState.CLOSED

    def failed(self) -> None:
        """Records a call that failed: a failed probe, or one failure too many, opens the breaker."""
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self.state = BreakerState.OPEN
            self._opened_at = time.monotonic()
