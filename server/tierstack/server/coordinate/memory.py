"""Learnt decompositions: each goal's subtasks, kept in a JSON-lines file and indexed for similarity."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from tierstack.server.ai import ModelError
from tierstack.server.coordinate.similarity import GoalIndex, NgramIndex
from tierstack.v1 import coordinator_service_pb2 as pb

_log = logging.getLogger(__name__)

#: How many goals the memory keeps unless told otherwise.
DEFAULT_MAX_ENTRIES = 10_000
#: How many bytes of goals and subtasks are kept unless told otherwise.
DEFAULT_MAX_BYTES = 64 << 20

Entries = dict[str, list[pb.Subtask]]


class GoalMemory:
    """Remembers decompositions, one per goal, and finds the one of the most similar past goal.

    A goal learnt again replaces its entry; beyond ``max_entries``, or ``max_bytes`` of goals and
    subtasks together, the goals learnt longest ago are forgotten. The file gets a line per
    decomposition learnt and is rewritten with only the live entries once it holds twice as many
    lines, so it stays within twice the entries' size.

    Args:
        path: The JSON-lines file that keeps them across restarts; None keeps them in memory only.
        index: How similarity is judged (character n-gram TF-IDF by default).
        max_entries: The most goals kept.
        max_bytes: The most bytes of goals and their subtasks (in their wire form) kept.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        index: GoalIndex | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._path = path
        self._index = index if index is not None else NgramIndex()
        self._max_entries = max(max_entries, 1)
        self._max_bytes = max_bytes
        self._subtasks: Entries = {}  # oldest first
        self._sizes: dict[str, int] = {}  # by goal: its bytes, with its subtasks'
        self._bytes = 0
        self._lines = 0  # in the file, live or replaced
        self._writing = asyncio.Lock()  # one writer of the file at a time: appends never interleave

    def __len__(self) -> int:
        return len(self._subtasks)

    async def load(self) -> None:
        """Reads the file, if there is one: a line that cannot be read is skipped with a warning, and
        the file is compacted if it holds many more lines than entries."""
        if self._path is None:
            return
        self._subtasks, self._lines = await asyncio.to_thread(_read, self._path, self._max_entries)
        for goal, subtasks in self._subtasks.items():
            self._sizes[goal] = _size(goal, subtasks)
        self._bytes = sum(self._sizes.values())
        self._trim()
        try:
            await self._index.add([(goal, goal) for goal in self._subtasks])
        except ModelError as exc:  # recall finds nothing until the goals are indexed at the next start
            _log.warning("goal memory: could not index the goals: %s", exc.message)
        await self._compact_if_stale()

    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask]) -> None:
        """Stores a goal's decomposition (a goal learnt again replaces its earlier one), forgetting
        the goals learnt longest ago beyond the most kept."""
        kept = [pb.Subtask.FromString(s.SerializeToString()) for s in subtasks]
        self._forget(goal)
        self._subtasks[goal] = kept
        self._sizes[goal] = _size(goal, kept)
        self._bytes += self._sizes[goal]
        await self._index.remove(self._trim(keep=goal))
        try:
            await self._index.add([(goal, goal)])
        except ModelError as exc:  # the goal is kept, and indexed again at the next start
            _log.warning("goal memory: could not index a goal: %s", exc.message)
        if self._path is not None:
            async with self._writing:
                await asyncio.to_thread(_append, self._path, _line(goal, kept))
                self._lines += 1
            await self._compact_if_stale()

    async def recall(
        self, goal: str, *, threshold: float, capabilities: set[str]
    ) -> tuple[str, list[pb.Subtask]] | None:
        """Returns the most similar past goal (at least ``threshold``) whose subtasks need only the
        given capabilities, with copies of its subtasks; None when there is none."""
        try:
            similar = await self._index.similar(goal)
        except ModelError as exc:  # decomposition goes on without past goals
            _log.warning("goal memory: no similarity search: %s", exc.message)
            return None
        for past, score in similar:
            if score < threshold:
                break
            subtasks = self._subtasks.get(past)  # None: forgotten while its indexing awaited the model
            if subtasks is not None and all(set(s.required_capabilities) <= capabilities for s in subtasks):
                return past, [pb.Subtask.FromString(s.SerializeToString()) for s in subtasks]
        return None

    def _forget(self, goal: str) -> None:
        if self._subtasks.pop(goal, None) is not None:
            self._bytes -= self._sizes.pop(goal)

    def _trim(self, keep: str = "") -> list[str]:
        """Forgets the goals learnt longest ago (but ``keep``) while too many or too large are kept;
        returns them."""
        forgotten = []
        while len(self._subtasks) > self._max_entries or self._bytes > self._max_bytes:
            oldest = next(iter(self._subtasks))
            if oldest == keep:
                break
            forgotten.append(oldest)
            self._forget(oldest)
        return forgotten

    async def _compact_if_stale(self) -> None:
        """Rewrites the file with the live entries alone once it holds twice as many lines (and 64)."""
        if self._path is None or self._lines <= max(2 * len(self._subtasks), 64):
            return
        async with self._writing:
            entries = list(self._subtasks.items())  # the stored subtasks are never changed, only replaced
            await asyncio.to_thread(_rewrite, self._path, entries)
            self._lines = len(entries)


def _size(goal: str, subtasks: Sequence[pb.Subtask]) -> int:
    return len(goal.encode()) + sum(subtask.ByteSize() for subtask in subtasks)


def _line(goal: str, subtasks: Sequence[pb.Subtask]) -> str:
    return json.dumps({"goal": goal, "subtasks": [json_format.MessageToDict(s) for s in subtasks]}) + "\n"


def _read(path: Path, max_entries: int) -> tuple[Entries, int]:
    """Returns the last ``max_entries`` goals of the file, oldest first, and its number of lines."""
    entries: Entries = {}
    lines = 0
    unreadable: list[int] = []
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return entries, 0
    with file:
        for raw in file:
            lines += 1
            if not raw.strip():
                continue
            record = _parse(raw)
            if record is None:
                unreadable.append(lines)
                continue
            goal, subtasks = record
            entries.pop(goal, None)
            entries[goal] = subtasks
            if len(entries) > max_entries:
                del entries[next(iter(entries))]
    if unreadable:
        count, first = len(unreadable), unreadable[0]
        _log.warning("goal memory: skipped %d unreadable lines of %s (the first: line %d)", count, path.name, first)
    return entries, lines


def _parse(raw: bytes) -> tuple[str, list[pb.Subtask]] | None:
    """Returns the goal and subtasks of one line of the file; None when it holds no such thing."""
    try:
        record = json.loads(raw)
        goal, subtasks = record["goal"], [json_format.ParseDict(s, pb.Subtask()) for s in record["subtasks"]]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, json_format.ParseError):
        return None
    return (goal, subtasks) if isinstance(goal, str) else None


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(line)


def _rewrite(path: Path, entries: list[tuple[str, list[pb.Subtask]]]) -> None:
    """Replaces the file at once (a new file renamed over it), so a crash leaves the old or the new one."""
    fresh = path.with_name(path.name + ".new")
    with fresh.open("w", encoding="utf-8") as file:
        file.writelines(_line(goal, subtasks) for goal, subtasks in entries)
        file.flush()
        os.fsync(file.fileno())
    os.replace(fresh, path)
