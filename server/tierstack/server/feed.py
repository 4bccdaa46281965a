"""A feed: events in order that any number of watchers follow live, until it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Generic, Protocol, TypeVar


class _Event(Protocol):
    @property
    def sequence(self) -> int: ...


E = TypeVar("E", bound=_Event)


class Feed(Generic[E]):
    """Holds the events of one run, goal or execution, in sequence order, for every watcher that follows it:
    those added already first, then each as it is added, until the feed ends (with the error its
    watchers get, if any)."""

    def __init__(self, events: Iterable[E] = ()) -> None:
        self.events: list[E] = list(events)
        self.ended = False
        self._error: Exception | None = None
        # Resolved at the next change; made only while someone waits (a feed is held by every live run
        # and execution: an idle one should cost no more than its events).
        self._changed: asyncio.Future[None] | None = None

    def extend(self, events: Iterable[E]) -> None:
        """Adds events, and wakes every watcher."""
        self.events.extend(events)
        self._wake()

    def end(self, error: Exception | None = None) -> None:
        """Ends the feed (the first end counts), with the error its watchers get, if any."""
        if not self.ended:
            self.ended, self._error = True, error
            self._wake()

    async def follow(self, after_sequence: int = 0) -> AsyncIterator[E]:
        """Yields the events with a sequence number above ``after_sequence``, waiting for each next
        one, until the feed ends.

        Raises:
            Exception: The error the feed ended with.
        """
        events = self.events
        index = next((i for i, event in enumerate(events) if event.sequence > after_sequence), len(events))
        while True:
            while index < len(events):
                yield events[index]
                index += 1
            if self.ended:
                if self._error is not None:
                    raise self._error
                return
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)  # one watcher leaving cancels nothing for the others

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)
