"""Learnt decompositions: every goal's subtasks, kept in a JSON-lines file and indexed for similarity."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from tierstack.server.ai import ModelError
from tierstack.server.coordinate.similarity import GoalIndex, NgramIndex
from tierstack.v1 import coordinator_service_pb2 as pb

_log = logging.getLogger(__name__)


class GoalMemory:
    """Remembers decompositions, and finds the one of the most similar past goal.

    Args:
        path: The JSON-lines file that keeps them across restarts; None keeps them in memory only.
        index: How similarity is judged (character n-gram TF-IDF by default).
    """

    def __init__(self, path: Path | None = None, *, index: GoalIndex | None = None) -> None:
        self._path = path
        self._index = index if index is not None else NgramIndex()
        self._subtasks: dict[str, list[pb.Subtask]] = {}

    async def load(self) -> None:
        """Reads the file, if there is one."""
        if self._path is None or not await asyncio.to_thread(self._path.exists):
            return
        for line in (await asyncio.to_thread(self._path.read_text, encoding="utf-8")).splitlines():
            if line.strip():
                record = json.loads(line)
                self._subtasks[record["goal"]] = [json_format.ParseDict(s, pb.Subtask()) for s in record["subtasks"]]
        await self._index.add([(goal, goal) for goal in self._subtasks])

    async def learn(self, goal: str, subtasks: Sequence[pb.Subtask]) -> None:
        """Stores a goal's decomposition (a goal learnt again replaces its earlier one)."""
        kept = [pb.Subtask.FromString(s.SerializeToString()) for s in subtasks]
        self._subtasks[goal] = kept
        try:
            await self._index.add([(goal, goal)])
        except ModelError as exc:  # the goal is kept, and indexed again at the next start
            _log.warning("goal memory: could not index a goal: %s", exc.message)
        if self._path is not None:
            line = json.dumps({"goal": goal, "subtasks": [json_format.MessageToDict(s) for s in kept]}) + "\n"
            await asyncio.to_thread(_append, self._path, line)

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
            subtasks = self._subtasks[past]
            if all(set(s.required_capabilities) <= capabilities for s in subtasks):
                return past, [pb.Subtask.FromString(s.SerializeToString()) for s in subtasks]
        return None


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(line)
