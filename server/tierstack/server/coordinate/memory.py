"""Learnt decompositions: each goal's subtasks, kept in the goal store and indexed for similarity,
and re-bound to the particulars of a new goal when recalled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tierstack.core.values import from_struct, to_struct
from tierstack.server.ai import ModelError
from tierstack.server.auth.principal import scoped, unnamespaced
from tierstack.server.coordinate.particulars import Rebinder, Token, rebinding, shape, tokens
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


@dataclass(frozen=True, slots=True)
class Recalled:
    """A past goal's decomposition, re-bound to a new goal.

    Attributes:
        goal: The past goal.
        subtasks: Its subtasks, each particular of the past goal replaced by the new goal's.
        rebound: Each particular of the past goal that differs, with what replaced it.
    """

    goal: str
    subtasks: list[pb.Subtask]
    rebound: dict[str, str]


class GoalMemory:
    """Remembers decompositions, one per goal, and finds the one of the most similar past goal.

    Goals are indexed by their shape (their words, each particular replaced by its kind), so that a
    goal that differs from a past one in particulars alone finds it whatever the particulars are.
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
        if not kept:
            self._forget(key)
            await self._index.remove([key])
            return
        self._hold(key, kept)
        await self._index.remove(self._trim(keep=key))
        await self._add_to_index([key])

    async def demote(self, goal: str) -> None:
        """Stops reusing a goal's decomposition (one that failed): it is stored as learnt with no
        subtasks, so that every replica forgets it, until a decomposition of the goal succeeds."""
        await self.learn(goal, [])

    async def recall(self, goal: str, *, threshold: float, capabilities: set[str]) -> Recalled | None:
        """Returns the decomposition of the calling tenant's most similar past goal (at least
        ``threshold``) that differs from ``goal`` in particulars alone and needs only the given
        capabilities, re-bound to ``goal``; None when there is none."""
        if self._store.shared:
            await self._read_learnt()
        new = await asyncio.to_thread(tokens, goal)  # text work, off the loop, once
        try:
            similar = await self._index.similar(shape(new), limit=_CANDIDATES, prefix=scoped(""))
        except ModelError as exc:  # decomposition goes on without past goals
            _log.warning("goal memory: no similarity search: %s", exc.message)
            return None
        candidates = []
        for past, score in similar:
            if score < threshold:
                break
            subtasks = self._subtasks.get(past)  # None: forgotten while its indexing awaited the model
            if subtasks is not None and all(set(s.required_capabilities) <= capabilities for s in subtasks):
                candidates.append((unnamespaced(past), subtasks))
        return await asyncio.to_thread(_adapted, new, candidates) if candidates else None

    async def _read_learnt(self) -> None:
        """Holds and indexes the decompositions stored since the last read (by this replica or
        another); one this process holds already, unchanged, is not indexed again."""
        async with self._reading:
            fresh: dict[str, None] = {}
            demoted: list[str] = []
            while batch := await self._store.learnt(after=self._read, limit=_PAGE):
                for learnt in batch:
                    if not learnt.subtasks:
                        self._forget(learnt.goal)
                        demoted.append(learnt.goal)
                        fresh.pop(learnt.goal, None)
                        continue
                    if self._subtasks.get(learnt.goal) != learnt.subtasks:
                        fresh[learnt.goal] = None
                    self._hold(learnt.goal, learnt.subtasks)
                self._read = batch[-1].position
            await self._index.remove([*demoted, *self._trim()])
            await self._add_to_index([goal for goal in fresh if goal in self._subtasks])

    async def _add_to_index(self, keys: list[str]) -> None:
        if not keys:
            return
        shapes = await asyncio.to_thread(lambda: [(key, shape(tokens(unnamespaced(key)))) for key in keys])
        try:
            await self._index.add(shapes)
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


def _adapted(new: Sequence[Token], candidates: list[tuple[str, list[pb.Subtask]]]) -> Recalled | None:
    """Returns the decomposition of the candidate that can be re-bound to the goal of tokens ``new``
    with the fewest particulars changed: its goal differs in particulars alone, and each particular
    that differs is found in its subtasks, as a whole token, and nowhere else in another form."""
    mappings = [
        (mapping, past, subtasks)
        for past, subtasks in candidates
        if (mapping := rebinding(tokens(past), new)) is not None
    ]
    for mapping, past, subtasks in sorted(mappings, key=lambda found: len(found[0])):
        rebinder = Rebinder(mapping)
        rebound = []
        for subtask in subtasks:
            copy = pb.Subtask.FromString(subtask.SerializeToString())
            copy.description = rebinder.text(copy.description)
            parameters = {name: rebinder.value(value) for name, value in from_struct(copy.parameters).items()}
            if mapping:
                copy.parameters.CopyFrom(to_struct(parameters))
            rebound.append(copy)
            if rebinder.stale([copy.description, parameters]):
                break  # the past goal's particular is still there in a form not re-bound
        else:
            if not rebinder.unused:  # a particular that no subtask names may have shaped them unseen
                return Recalled(past, rebound, {old.text: fresh for old, fresh in mapping.items()})
    return None


def _size(goal: str, subtasks: Sequence[pb.Subtask]) -> int:
    return len(goal.encode()) + sum(subtask.ByteSize() for subtask in subtasks)
