"""Learnt decompositions: each goal's subtasks, kept in the goal store and indexed for similarity."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from tierstack.server.ai import ModelError
from tierstack.server.auth.principal import scoped, unnamespaced
from tierstack.server.coordinate.similarity import GoalIndex, NgramIndex
from tierstack.server.coordinate.store import GoalStore, MemoryGoalStore
from tierstack.v1 import coordinator_service_pb2 as pb

_log = logging.getLogger(__name__)

#: How many goals the memory keeps unless told otherwise.
DEFAULT_MAX_ENTRIES = 10_000
#: How many bytes of goals and subtasks are kept unless told otherwise.
DEFAULT_MAX_BYTES = 64 << 20
# How many decompositions are read from the store at once.
_PAGE = 500
# How many of the calling tenant's most similar past goals are looked at.
_CANDIDATES = 32


class GoalMemory:
    """Remembers decompositions, one per goal, and finds the one of the most similar past goal.

    Each tenant learns and recalls its own goals only: a goal is kept under a key namespaced by the
    tenant of the call (see :func:`~tierstack.server.auth.principal.scoped`) and indexed by its text.
    The decompositions are kept in the goal store, which keeps the newest ``max_entries`` (a goal
    learnt again replaces its entry and counts as newest); this process holds them indexed, within
    ``max_bytes`` of goals and subtasks together, forgetting those learnt longest ago. On a store
    that replicas share, what the others learnt is read before each recall.

    Args:
        store: Where decompositions are kept; by default, this process alone.
        index: How similarity is judged (character n-gram TF-IDF by default).
        max_entries: The most goals kept.
        max_bytes: The most bytes of goals and their subtasks (in their wire form) this process holds.
    """

    def __init__(
        self,
        store: GoalStore | None = None,
        *,
        index: GoalIndex | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._store = store if store is not None else MemoryGoalStore()
        self._index = index if index is not None else NgramIndex()
        self._max_entries = max(max_entries, 1)
        self._max_bytes = max_bytes
        self._subtasks: dict[str, list[pb.Subtask]] = {}  # oldest first
        self._sizes: dict[str, int] = {}  # by goal: its bytes, with its subtasks'
        self._bytes = 0
        self._read = 0  # the position in the store of the last decomposition read
        self._reading = asyncio.Lock()  # one reader of the store at a time

    def __len__(self) -> int:
        return len(self._subtasks)

    async def load(self) -> None:
        """Reads and indexes what the store keeps."""
        await self._read_learnt()

    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask]) -> None:
        """Stores a goal's decomposition (a goal learnt again replaces its earlier one), forgetting
        the goals learnt longest ago beyond the most kept."""
        kept = [pb.Subtask.FromString(s.SerializeToString()) for s in subtasks]
        key = scoped(goal)
        await self._store.learn(key, kept, keep=self._max_entries)
        self._hold(key, kept)
        await self._index.remove(self._trim(keep=key))
        await self._add_to_index([key])

    async def recall(
        self, goal: str, *, threshold: float, capabilities: set[str]
    ) -> tuple[str, list[pb.Subtask]] | None:
        """Returns the calling tenant's most similar past goal (at least ``threshold``) whose subtasks
        need only the given capabilities, with copies of its subtasks; None when there is none."""
        if self._store.shared:
            await self._read_learnt()
        try:
            similar = await self._index.similar(goal, limit=_CANDIDATES, prefix=scoped(""))
        except ModelError as exc:  # decomposition goes on without past goals
            _log.warning("goal memory: no similarity search: %s", exc.message)
            return None
        for past, score in similar:
            if score < threshold:
                break
            subtasks = self._subtasks.get(past)  # None: forgotten while its indexing awaited the model
            if subtasks is not None and all(set(s.required_capabilities) <= capabilities for s in subtasks):
                return unnamespaced(past), [pb.Subtask.FromString(s.SerializeToString()) for s in subtasks]
        return None

    async def _read_learnt(self) -> None:
        """Holds and indexes the decompositions stored since the last read (by this replica or
        another); one this process holds already, unchanged, is not indexed again."""
        async with self._reading:
            fresh: dict[str, None] = {}
            while batch := await self._store.learnt(after=self._read, limit=_PAGE):
                for learnt in batch:
                    if self._subtasks.get(learnt.goal) != learnt.subtasks:
                        fresh[learnt.goal] = None
                    self._hold(learnt.goal, learnt.subtasks)
                self._read = batch[-1].position
            await self._index.remove(self._trim())
            await self._add_to_index([goal for goal in fresh if goal in self._subtasks])

    async def _add_to_index(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self._index.add([(key, unnamespaced(key)) for key in keys])
        except ModelError as exc:  # the goals are kept, and indexed again at the next start
            _log.warning("goal memory: could not index %d goals: %s", len(keys), exc.message)

    def _hold(self, goal: str, subtasks: list[pb.Subtask]) -> None:
        """Holds a decomposition as the newest."""
        self._forget(goal)
        self._subtasks[goal] = subtasks
        self._sizes[goal] = _size(goal, subtasks)
        self._bytes += self._sizes[goal]

    def _forget(self, goal: str) -> None:
        if self._subtasks.pop(goal, None) is not None:
            self._bytes -= self._sizes.pop(goal)

    def _trim(self, keep: str = "") -> list[str]:
        """Forgets the goals learnt longest ago (but ``keep``) while too many or too large are held;
        returns them."""
        forgotten = []
        while len(self._subtasks) > self._max_entries or self._bytes > self._max_bytes:
            oldest = next(iter(self._subtasks))
            if oldest == keep:
                break
            forgotten.append(oldest)
            self._forget(oldest)
        return forgotten


def _size(goal: str, subtasks: Sequence[pb.Subtask]) -> int:
    return len(goal.encode()) + sum(subtask.ByteSize() for subtask in subtasks)
