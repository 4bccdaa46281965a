"""Retention: a sweep that removes what has been kept long enough, run at start and every few minutes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

_log = logging.getLogger(__name__)

#: The longest time between two sweeps, in seconds (a shorter retention sweeps as often as it lasts).
SWEEP_SECONDS = 300.0

#: Removes what is older than its argument, a time in seconds since the epoch.
Sweep = Callable[[float], Awaitable[None]]


class Sweeper:
    """Calls ``sweep`` with the time before which things go, at :meth:`start` and then every
    :data:`SWEEP_SECONDS` (or ``retention``, when shorter); a failed sweep is logged and tried again
    next time.

    Args:
        what: What it removes, for the log ("runs", "workspaces").
        retention: How long things are kept, in seconds; 0 keeps them forever (no sweep runs).
        sweep: Removes what is older than its argument.
    """

    def __init__(self, what: str, retention: float, sweep: Sweep) -> None:
        self._what = what
        self._retention = retention
        self._sweep = sweep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts sweeping (nothing happens when the retention is 0)."""
        if self._retention > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"tierstack-retention-{self._what}")

    async def close(self) -> None:
        """Stops sweeping and waits until it has stopped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._sweep(time.time() - self._retention)
            except Exception as exc:
                _log.warning(
                    "removing old %s failed (%s); trying again at the next sweep", self._what, type(exc).__name__
                )
            await asyncio.sleep(min(SWEEP_SECONDS, self._retention))
