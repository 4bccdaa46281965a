"""Goal decomposition by the local provider: deterministic rules that need no model or network.

The rules split a goal into stages at sequencing words (``then``, ``after that``, ``finally``,
``;``, new lines) and each stage into parallel parts at ``and`` followed by an action verb. Every
part of a stage depends on every part of the stage before. A part that names a URL becomes an
``http.request``; any other part renders a report of its task and its dependencies' outputs with
``text.template``. A subtask reads a dependency's output as the input named after it,
``{{inputs.<dependency id>}}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tierstack.core.errors import InvalidArgumentError, Violation
from tierstack.core.values import JSON
from tierstack.server.ai import Scope
from tierstack.server.boundary import MAX_TEAM
from tierstack.v1 import coordinator_service_pb2 as pb

_STAGE_BREAK = re.compile(
    r"\s*(?:\n+|;|,?\s*\band then\b|,?\s*\bthen\b|,?\s*\bafter that\b|,?\s*\bfinally\b)\s*", re.IGNORECASE
)
_ACTIONS = (
    r"fetch|get|download|call|query|extract|summari[sz]e|write|draft|analy[sz]e|compare|count|list|check|"
    r"find|collect|render|format|compute|calculate|report|review|translate|send|read|search|classify|rank"
)
_PARALLEL_BREAK = re.compile(rf"\s*(?:,\s*and|\band|,)\s+(?=(?:also\s+)?(?:{_ACTIONS})\b)", re.IGNORECASE)
#: A URL in a goal.
URL = re.compile(r"https?://[^\s,;]+[^\s,;.)]")
_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*")
_CAPABILITY_WORDS = (
    (
        "writing",
        re.compile(r"\b(summari[sz]e|write|draft|report|compose|translate|format)\w*", re.IGNORECASE),
    ),
    (
        "analysis",
        re.compile(r"\b(analy[sz]e|compare|evaluate|check|review|rank|classify|count|compute)\w*", re.I),
    ),
)
_URGENT = re.compile(r"\b(urgent|asap|first|critical|immediately)\b", re.IGNORECASE)
_REPORT_TEMPLATE = (
    "{{ task }}{% for name, output in inputs.items() %}\n[{{ name }}] {{ output | string | truncate(400) }}{% endfor %}"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SubtaskSpec:
    """One subtask of a goal, with the tool call that carries it out."""

    id: str
    description: str
    dependencies: tuple[str, ...]
    complexity: int
    required_capabilities: tuple[str, ...]
    priority: pb.Priority.ValueType
    tool: str
    parameters: dict[str, JSON]


def _stages(goal: str) -> list[list[str]]:
    stages = []
    for stage in _STAGE_BREAK.split(goal.strip()):
        parts = [_NUMBERING.sub("", part).strip(" .") for part in _PARALLEL_BREAK.split(stage)]
        parts = [part for part in parts if part]
        if parts:
            stages.append(parts)
    return stages


def _subtask(subtask_id: str, text: str, dependencies: tuple[str, ...], has_dependents: bool) -> SubtaskSpec:
    url = URL.search(text)
    words = len(text.split())
    priority = pb.PRIORITY_HIGH if has_dependents or _URGENT.search(text) else pb.PRIORITY_MEDIUM
    if url is not None:
        return SubtaskSpec(
            id=subtask_id,
            description=text,
            dependencies=dependencies,
            complexity=min(10, 3 + words // 6),
            required_capabilities=("http",),
            priority=priority,
            tool="http.request",
            parameters={"url": url.group(0), "method": "GET"},
        )
    capability = next((name for name, pattern in _CAPABILITY_WORDS if pattern.search(text)), "general")
    return SubtaskSpec(
        id=subtask_id,
        description=text,
        dependencies=dependencies,
        complexity=min(10, 1 + words // 4 + len(dependencies)),
        required_capabilities=(capability,),
        priority=priority,
        tool="text.template",
        parameters={
            "template": _REPORT_TEMPLATE,
            "variables": {
                "task": text,
                "inputs": {dep: f"{{{{inputs.{dep}}}}}" for dep in dependencies},
            },
        },
    )


class LocalProvider:
    """Decomposes goals with deterministic rules; the embedded default, needing no network."""

    name = "local"

    async def decompose(self, goal: str, agents: Sequence[pb.Agent], scope: Scope) -> list[SubtaskSpec]:
        """Returns the subtasks of ``goal`` (the rules need neither the agents nor a budget).

        Raises:
            InvalidArgumentError: The goal is empty, holds nothing to do, or splits into more subtasks
                than one team may take.
        """
        stages = _stages(goal)
        if not stages:
            raise InvalidArgumentError([Violation("goal", "states nothing to do")])
        parts = sum(len(stage) for stage in stages)
        if parts > MAX_TEAM:
            raise InvalidArgumentError(
                [Violation("goal", f"splits into {parts} subtasks; a goal may have at most {MAX_TEAM}")]
            )
        subtasks: list[SubtaskSpec] = []
        previous: tuple[str, ...] = ()
        for index, stage in enumerate(stages):
            ids = tuple(f"s{len(subtasks) + n + 1}" for n in range(len(stage)))
            has_dependents = index + 1 < len(stages)
            subtasks.extend(_subtask(i, text, previous, has_dependents) for i, text in zip(ids, stage, strict=True))
            previous = ids
        return subtasks


def check_goal(goal: str, agent_ids: Sequence[str]) -> None:
    """Checks a goal request's goal text and agent ids.

    Raises:
        InvalidArgumentError: Naming every offending field.
    """
    violations = []
    if not goal.strip():
        violations.append(Violation("goal", "must not be empty"))
    if not agent_ids:
        violations.append(Violation("agents", "at least one agent is needed to carry out a goal"))
    seen: set[str] = set()
    for index, agent_id in enumerate(agent_ids):
        if not agent_id:
            violations.append(Violation(f"agents[{index}].id", "must not be empty"))
        elif agent_id in seen:
            violations.append(Violation(f"agents[{index}].id", f"duplicates agent {agent_id!r}"))
        seen.add(agent_id)
    if violations:
        raise InvalidArgumentError(violations)
