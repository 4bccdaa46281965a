"""One goal's events, written behind in batches under its owner's fence.

Events are written behind, with no fixed window: the writer writes as soon as it is free, taking every
event that waits (alone, an event is stored one write after it happens; while a write is under way,
the events that come meanwhile share the next). A transition of the goal itself is written at once,
with whatever waits before it, in the same write. Watchers see
an event only once it is stored, numbered by the store, so a restart never renumbers an event anyone
saw. A write refused because another owner took the goal ends the journal: it is never retried.

Tier 2's run event log batches many runs into one transaction, numbers events in the owner and
takes a refused run out of its batch; a journal writes one goal's batches and lets the store number
them. The two are alike enough to become one log (not done yet).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tierstack.core.lifecycle import Fence, StaleOwnerError
from tierstack.server.coordinate.store import GoalStore
from tierstack.server.feed import Feed
from tierstack.v1 import coordinator_service_pb2 as pb

_log = logging.getLogger(__name__)
#: The first and the longest wait before a failed write is tried again, in seconds.
RETRY_SECONDS = (0.01, 5.0)


class GoalJournal:
    """Writes one goal's events and transitions, and lets watchers follow them.

    Args:
        store: Where the goal is kept.
        goal: The goal as its owner holds it.
        fence: The owner's fence.
        history: The events already stored.
        on_lost: Called once when a write is refused because another owner holds the goal.
    """

    def __init__(
        self,
        store: GoalStore,
        goal: pb.Goal,
        fence: Fence,
        history: list[pb.GoalEvent],
        *,
        on_lost: Callable[[StaleOwnerError], None],
    ) -> None:
        self._store = store
        self.goal = goal
        self.fence = fence
        #: The stored events, for watchers; it ends when the journal does, or is lost.
        self.feed: Feed[pb.GoalEvent] = Feed(history)
        self._on_lost = on_lost
        self._pending: list[pb.GoalEvent] = []
        self._failures = 0  # failed writes in a row
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self.lost: StaleOwnerError | None = None
        self._closed = False

    def record(self, event: pb.GoalEvent) -> None:
        """Queues an event; it is written with the next batch."""
        if self.lost is not None:
            return  # the goal is another owner's: its driver is being stopped
        self._pending.append(event)
        if self._timer is None and self._writer is None and not self._closed:
            self._write_soon()

    def _write_soon(self) -> None:
        self._timer = None
        self._writer = asyncio.create_task(self._write_behind(), name=f"goal-journal-{self.goal.goal_id}")

    async def _write_behind(self) -> None:
        try:
            await self.flush()
        except StaleOwnerError:
            pass  # flush told the owner
        except Exception as exc:
            self._failures += 1
            if self._failures == 1:  # told once, not on every retry while the store is down
                _log.warning(
                    "writing the events of goal %s failed (%s); they are kept and tried again with backoff",
                    self.goal.goal_id,
                    type(exc).__name__,
                )
        else:
            self._failures = 0
        finally:
            self._writer = None
            if self._pending and self._timer is None and self.lost is None and not self._closed:
                if self._failures:
                    wait = min(RETRY_SECONDS[1], RETRY_SECONDS[0] * 2 ** min(self._failures, 16))
                    self._timer = asyncio.get_running_loop().call_later(wait, self._write_soon)
                else:
                    self._write_soon()  # what came while it wrote

    async def flush(self, event: pb.GoalEvent | None = None, *, transition: str | None = None) -> None:
        """Writes what waits, then ``event``, in one write; with ``transition``, the goal's record
        (as :attr:`goal` holds it) moves on in the same write.

        Raises:
            StaleOwnerError: Another owner holds the goal; nothing was written, and nothing will be.
            IllegalTransitionError: The goal is not in the state its owner believes.
        """
        async with self._lock:
            if self.lost is not None:
                raise self.lost
            batch = [*self._pending, *([event] if event is not None else [])]
            self._pending.clear()
            if not batch and transition is None:
                return
            try:
                written = await self._store.write(self.goal, self.fence, batch, transition=transition)
            except StaleOwnerError as exc:
                self.lose(exc)
                raise
            except Exception:
                if event is not None:
                    batch.pop()  # the caller of a transition learns of the failure; the rest waits
                self._pending[:0] = batch
                raise
            self.goal = written.goal
            self.feed.extend(written.events)

    def lose(self, error: StaleOwnerError) -> None:
        """Stops the journal for good: another owner holds the goal, and its events are theirs to tell."""
        _log.warning("goal %s is owned elsewhere now; this server stops pursuing it", self.goal.goal_id)
        self.lost = error
        self.feed.end(error)  # its events are that owner's to tell
        self._pending.clear()
        self._on_lost(error)

    def finish(self) -> None:
        """Marks the journal as done: watchers get what is stored and end."""
        self.feed.end()

    async def close(self) -> None:
        """Writes what waits (unless the goal is another owner's) and waits for the writer."""
        self._closed = True  # no writer is started from now on but the last flush below
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._writer is not None:
            await asyncio.shield(self._writer)
        async with self._lock:
            pass  # a write in flight (a shielded transition) is done
        if self._pending and self.lost is None:
            try:
                await self.flush()
            except Exception:
                _log.exception("the last events of goal %s could not be written", self.goal.goal_id)
