"""Write-behind persistence of run events, with group commit.

Events queue in memory and are written in batches, in one transaction each, as soon as the writer is
free: an event recorded while the writer is idle is written at the next turn of the event loop with
everything recorded in the same turn, and the events recorded while a batch is being written gather
and go together once it is stored (group commit without a fixed window, so a watcher sees an event a
commit after it happens, and under load many runs' events share a transaction). A run's state (its
``Run`` record) is written with the batch when the caller asks for it, at the run's own transitions;
step states are rebuilt from events on resume. Nobody sees an event before it is stored: the caller
is told of events only after their batch is written, so a restart never renumbers an event anyone
saw.

Each run's writes carry its owner's fence; when the store refuses a run's writes (another owner
claimed the run, or the writer believes a state the run has left), that run's events are taken out
of the batch, its ``on_lost`` is called and the rest of the batch is written.

When the store fails, nothing accepted is dropped: the batch waits and is tried again after a
capped, jittered exponential backoff, while the log reports itself unhealthy; callers that would add
work wait (:meth:`EventLog.room`) while more than ``max_queued`` events are waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tierstack.core.lifecycle import Fence, IllegalTransitionError, StaleOwnerError
from tierstack.server.metrics import LatencyHistogram
from tierstack.server.orchestrate.store import Run, RunEvent, RunStore

_log = logging.getLogger(__name__)


#: The longest wait before a failed write is tried again, and the first, in seconds; each wait is
#: drawn uniformly below its cap (full jitter), the cap doubling per failure in a row.
RETRY_SECONDS = (0.05, 5.0)
#: How many events may wait to be stored before new steps wait for room.
MAX_QUEUED = 10_000

#: Tells the server whether the log can store (False when writes start failing, True once they work).
HealthReport = Callable[[bool], Awaitable[None]]


@dataclass(slots=True)
class FlushStats:
    """What the log has written so far."""

    events: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    largest_batch: int = 0
    failures: int = 0
    last_written: float = field(default_factory=time.monotonic)

    @property
    def mean_batch(self) -> float:
        """Returns the mean number of events per stored batch."""
        return self.events / self.latency.count if self.latency.count else 0.0

    @property
    def write_age(self) -> float:
        """Returns the seconds since a batch was last stored (since the log was made, before the first)."""
        return time.monotonic() - self.last_written


@dataclass(slots=True)
class _Batch:
    events: list[RunEvent] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    listeners: dict[str, Callable[[list[RunEvent]], None]] = field(default_factory=dict)
    fences: dict[str, Fence] = field(default_factory=dict)
    lost: dict[str, Callable[[], None]] = field(default_factory=dict)
    # Done when the batch is stored; a failed batch's futures move to the batch it is merged into.
    written: list[asyncio.Future[None]] = field(default_factory=list)


class EventLog:
    """Batches writes of events (and run records) to a :class:`RunStore`.

    Args:
        store: Where batches go.
        max_queued: :meth:`room` waits while this many events wait to be stored.
        retry: The first and the longest wait before a failed write is tried again, in seconds.
    """

    def __init__(
        self,
        store: RunStore,
        *,
        max_queued: int = MAX_QUEUED,
        retry: tuple[float, float] = RETRY_SECONDS,
    ) -> None:
        self._store = store
        self._max_queued = max_queued
        self._retry = retry
        self._batch = _Batch()
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False
        self._queued = 0  # recorded, not yet stored
        self._room = asyncio.Event()
        self._room.set()
        self._failures_in_row = 0
        self._health: HealthReport | None = None
        self.stats = FlushStats()

    @property
    def failing(self) -> bool:
        """Says whether the last write failed (the store is unavailable)."""
        return self._failures_in_row > 0

    @property
    def queued(self) -> int:
        """Counts the events recorded and not yet stored."""
        return self._queued

    def report_health(self, report: HealthReport) -> None:
        """Gives the log the way to tell whether it can store: ``report(False)`` once writes start
        failing, ``report(True)`` once they work again."""
        self._health = report

    async def room(self) -> None:
        """Returns once fewer than ``max_queued`` events wait to be stored: at once, unless the store
        is failing or falling behind."""
        while self._queued >= self._max_queued:
            await self._room.wait()

    def record(
        self,
        run: Run,
        event: RunEvent,
        on_written: Callable[[list[RunEvent]], None],
        *,
        fence: Fence,
        on_lost: Callable[[], None] = lambda: None,
        with_run: bool = False,
    ) -> asyncio.Future[None]:
        """Queues ``event`` (and, with ``with_run``, the run record as it is when written), written
        under ``fence``; ``on_written`` gets the run's events once their batch is stored, and
        ``on_lost`` is called instead when the store refuses them because the run has another owner.
        Returns a future done when the batch is stored (however long the store takes to come back)."""
        batch = self._batch
        batch.events.append(event)
        batch.listeners[run.run_id] = on_written
        batch.fences[run.run_id] = fence
        batch.lost[run.run_id] = on_lost
        if with_run:
            batch.runs[run.run_id] = run
        self._queued += 1
        if self._queued >= self._max_queued:
            self._room.clear()
        if not batch.written:
            batch.written.append(asyncio.get_running_loop().create_future())
        if not self.failing:  # else the next retry takes it, not sooner: the backoff holds
            self._write_soon()
        return batch.written[0]

    def _write_soon(self) -> None:
        if self._closed:
            return  # close() writes what is left itself, with no other writer
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
        if self._batch.events and self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self._next_wait(), self._write_soon)

    def _next_wait(self) -> float:
        if not self.failing:
            return 0.0
        first, longest = self._retry
        return random.uniform(0, min(longest, first * 2 ** min(self._failures_in_row - 1, 32)))

    async def _write(self, batch: _Batch) -> bool:
        self._batch = _Batch()
        # Run records are serialised now, so each matches the events written with it.
        runs = [Run.FromString(run.SerializeToString()) for run in batch.runs.values()]
        start = time.perf_counter()
        while True:
            try:
                await self._store.write(runs, batch.events, batch.fences)
                break
            except (StaleOwnerError, IllegalTransitionError) as exc:  # this run's writes, not the store, are refused
                runs = self._drop(batch, runs, exc.metadata["run_id"], exc.message)
            except Exception as exc:
                self._requeue(batch)
                await self._failed(exc)
                return False
        stats = self.stats
        stats.events += len(batch.events)
        stats.latency.record(time.perf_counter() - start)
        stats.largest_batch = max(stats.largest_batch, len(batch.events))
        stats.last_written = time.monotonic()
        self._queued -= len(batch.events)
        if self._queued < self._max_queued:
            self._room.set()
        by_run: dict[str, list[RunEvent]] = {}
        for event in batch.events:
            by_run.setdefault(event.run_id, []).append(event)
        for run_id, events in by_run.items():
            batch.listeners[run_id](events)
        for future in batch.written:
            if not future.done():
                future.set_result(None)
        if self.failing:
            self._failures_in_row = 0
            _log.info("the run store works again: every waiting event is stored")
            if self._health is not None:
                await self._health(True)
        return True

    async def _failed(self, error: Exception) -> None:
        self.stats.failures += 1
        self._failures_in_row += 1
        if self._failures_in_row > 1:
            return  # told once, when the store started failing
        _log.warning(
            "the run store fails (%s); %d events wait and are tried again with backoff, new steps wait for room",
            type(error).__name__,
            self._queued,
        )
        if self._health is not None:
            await self._health(False)

    def _drop(self, batch: _Batch, runs: list[Run], run_id: str, why: str) -> list[Run]:
        """Takes a run the store refused out of a batch, tells it, and returns the other records."""
        _log.warning("the store refuses the writes of run %s (%s): it stops here", run_id, why)
        kept = [event for event in batch.events if event.run_id != run_id]
        self._queued -= len(batch.events) - len(kept)
        batch.events = kept
        batch.runs.pop(run_id, None)
        batch.listeners.pop(run_id, None)
        batch.fences.pop(run_id, None)
        batch.lost.pop(run_id)()
        return [run for run in runs if run.run_id != run_id]

    def _requeue(self, failed: _Batch) -> None:
        """Puts a failed batch back in front of what gathered since."""
        newer = self._batch
        failed.events.extend(newer.events)
        failed.runs.update(newer.runs)
        failed.listeners.update(newer.listeners)
        failed.fences.update(newer.fences)
        failed.lost.update(newer.lost)
        failed.written.extend(newer.written)
        self._batch = failed

    async def close(self) -> None:
        """Writes what is queued and waits for the writer (it is never cancelled mid-write). When the
        store still fails, what waits is lost (and logged): its runs resume from what was stored."""
        self._closed = True
        while self._writer is not None:
            await asyncio.shield(self._writer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._batch.events and not await self._write(self._batch):
            _log.error("the run store still fails: %d events could not be stored", len(self._batch.events))
            for future in self._batch.written:
                future.cancel()
