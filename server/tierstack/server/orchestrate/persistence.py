"""Write-behind persistence of run events and run state, with group commit.

Events queue in memory and are written in batches, each batch with the latest state of the runs it
touches, in one transaction: on an interval, when the queue is long, and at once for a critical
transition, whose writer waits until its batch is durable. Nobody sees an event before it is stored:
watchers are told of events only after their batch is written, so a restart never renumbers an event
anyone saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tierstack.server.orchestrate.store import Run, RunEvent, RunStore

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class FlushStats:
    """What the log has written so far."""

    flushes: int = 0
    events: int = 0
    seconds: float = 0.0
    largest_batch: int = 0


@dataclass(slots=True)
class _Pending:
    events: list[RunEvent] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    listeners: dict[str, Callable[[list[RunEvent]], None]] = field(default_factory=dict)


class EventLog:
    """Batches writes of events and run state to a :class:`RunStore`.

    Args:
        store: Where batches go.
        interval: The longest an event waits before its batch is written, in seconds.
        max_batch: Writes the batch at once when this many events wait.
    """

    def __init__(self, store: RunStore, *, interval: float = 0.01, max_batch: int = 512) -> None:
        self._store = store
        self._interval = interval
        self._max_batch = max_batch
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._written: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = FlushStats()

    def start(self) -> None:
        """Starts the flusher task."""
        self._task = asyncio.create_task(self._flush_forever(), name="tierstack-event-log")

    async def close(self) -> None:
        """Writes what is queued and stops the flusher (it is not cancelled in the middle of a write)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        await self._flush()

    def _batch_written(self) -> asyncio.Future[None]:
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        return self._written

    def record(
        self, run: Run, event: RunEvent, on_written: Callable[[list[RunEvent]], None], *, critical: bool
    ) -> asyncio.Future[None]:
        """Queues ``event`` and the run's current state; ``on_written`` gets the run's events once
        their batch is stored. Returns a future done when the batch is stored; a critical record
        has its batch written at once."""
        pending = self._pending
        pending.events.append(event)
        pending.runs[run.run_id] = run
        pending.listeners[run.run_id] = on_written
        if critical or len(pending.events) >= self._max_batch:
            self._wake.set()
        return self._batch_written()

    async def _flush_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self._flush()
            except Exception:
                _log.exception("writing run events failed; they stay queued")
                await asyncio.sleep(self._interval)
            if self._stopping:
                return

    async def _flush(self) -> None:
        batch, written = self._pending, self._written
        if not batch.events:
            return
        self._pending, self._written = _Pending(), None
        # Snapshots are taken now, so the stored state matches the events written with it.
        runs = [Run.FromString(run.SerializeToString()) for run in batch.runs.values()]
        start = time.perf_counter()
        try:
            await self._store.write(runs, batch.events)
        except BaseException as exc:
            # Put the batch back in front, so nothing accepted is lost.
            self._pending.events[:0] = batch.events
            for run_id, run in batch.runs.items():
                self._pending.runs.setdefault(run_id, run)
                self._pending.listeners.setdefault(run_id, batch.listeners[run_id])
            if written is not None:
                if not isinstance(exc, asyncio.CancelledError):
                    # Critical writers see the error; the events are written with a later batch.
                    written.set_exception(exc)
                    written.exception()  # marks it retrieved when nobody waits for it
                elif self._written is None:
                    self._written = written
                else:
                    self._written.add_done_callback(lambda later: _follow(later, written))
            raise
        stats = self.stats
        stats.flushes += 1
        stats.events += len(batch.events)
        stats.seconds += time.perf_counter() - start
        stats.largest_batch = max(stats.largest_batch, len(batch.events))
        by_run: dict[str, list[RunEvent]] = {}
        for event in batch.events:
            by_run.setdefault(event.run_id, []).append(event)
        for run_id, events in by_run.items():
            batch.listeners[run_id](events)
        if written is not None:
            written.set_result(None)


def _follow(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    if target.done():
        return
    if source.cancelled() or source.exception() is None:
        target.set_result(None)
    else:
        target.set_exception(source.exception())  # type: ignore[arg-type]
