"""Write-behind persistence of run events, with group commit.

Events queue in memory and are written in batches, in one transaction each: a batch is written
``interval`` after its first event, or at once when an event is urgent or the queue is long; while a
batch is being written, the next one gathers. A run's state (its ``Run`` record) is written with
the batch when the caller asks for it, at the run's own transitions; step states are rebuilt from
events on resume. Nobody sees an event before it is stored: the caller is told of events only after
their batch is written, so a restart never renumbers an event anyone saw.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tierstack.server.metrics import LatencyHistogram
from tierstack.server.orchestrate.store import Run, RunEvent, RunStore

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class FlushStats:
    """What the log has written so far."""

    events: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    largest_batch: int = 0

    @property
    def mean_batch(self) -> float:
        """Returns the mean number of events per stored batch."""
        return self.events / self.latency.count if self.latency.count else 0.0


@dataclass(slots=True)
class _Batch:
    events: list[RunEvent] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    listeners: dict[str, Callable[[list[RunEvent]], None]] = field(default_factory=dict)
    written: asyncio.Future[None] | None = None


class EventLog:
    """Batches writes of events (and run records) to a :class:`RunStore`.

    Args:
        store: Where batches go.
        interval: The longest an event waits before its batch is written, in seconds.
        max_batch: Writes at once when this many events wait.
    """

    def __init__(self, store: RunStore, *, interval: float = 0.01, max_batch: int = 512) -> None:
        self._store = store
        self._interval = interval
        self._max_batch = max_batch
        self._batch = _Batch()
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._again = False
        self.stats = FlushStats()

    def record(
        self,
        run: Run,
        event: RunEvent,
        on_written: Callable[[list[RunEvent]], None],
        *,
        urgent: bool = False,
        with_run: bool = False,
    ) -> asyncio.Future[None]:
        """Queues ``event`` (and, with ``with_run``, the run record as it is when written);
        ``on_written`` gets the run's events once their batch is stored. Returns a future done then."""
        batch = self._batch
        batch.events.append(event)
        batch.listeners[run.run_id] = on_written
        if with_run:
            batch.runs[run.run_id] = run
        if batch.written is None:
            batch.written = asyncio.get_running_loop().create_future()
        if urgent or len(batch.events) >= self._max_batch:
            self._write_soon()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._write_soon)
        return batch.written

    def _write_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="tierstack-event-log")
        else:
            self._again = True  # the running writer takes what gathered once it is done

    async def _write_all(self) -> None:
        try:
            while self._batch.events:
                self._again = False
                if not await self._write(self._batch) or not self._again:
                    break
        finally:
            self._writer = None
        if self._batch.events and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._write_soon)

    async def _write(self, batch: _Batch) -> bool:
        self._batch = _Batch()
        # Run records are serialised now, so each matches the events written with it.
        runs = [Run.FromString(run.SerializeToString()) for run in batch.runs.values()]
        start = time.perf_counter()
        try:
            await self._store.write(runs, batch.events)
        except Exception as exc:
            _log.exception("writing %d run events failed; they are kept for the next batch", len(batch.events))
            self._requeue(batch)
            if batch.written is not None:
                batch.written.set_exception(exc)
                batch.written.exception()  # retrieved: whoever waits sees it, nobody else is warned
            return False
        stats = self.stats
        stats.events += len(batch.events)
        stats.latency.record(time.perf_counter() - start)
        stats.largest_batch = max(stats.largest_batch, len(batch.events))
        by_run: dict[str, list[RunEvent]] = {}
        for event in batch.events:
            by_run.setdefault(event.run_id, []).append(event)
        for run_id, events in by_run.items():
            batch.listeners[run_id](events)
        if batch.written is not None:
            batch.written.set_result(None)
        return True

    def _requeue(self, failed: _Batch) -> None:
        batch = self._batch
        batch.events[:0] = failed.events
        for run_id, run in failed.runs.items():
            batch.runs.setdefault(run_id, run)
        for run_id, listener in failed.listeners.items():
            batch.listeners.setdefault(run_id, listener)

    async def close(self) -> None:
        """Writes what is queued and waits for the writer (it is never cancelled mid-write)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._writer is not None:
            await asyncio.shield(self._writer)
        if self._batch.events:
            await self._write(self._batch)
