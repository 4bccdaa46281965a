"""Goal decomposition by a model: structured JSON asked for, validated, and asked again when malformed.

Each subtask the model names is carried out by the ``ai.complete`` tool, with its description and
its dependencies' outputs as the prompt.
"""

from __future__ import annotations

import graphlib
import json
import re
from collections.abc import Sequence
from typing import Any

import jsonschema

from tierstack.core.errors import ResourceExhaustedError, UnavailableError, Violation
from tierstack.core.values import JSON
from tierstack.server.ai import AIService, CompletionRequest, Message, ModelError, Scope
from tierstack.server.coordinate.decompose import SubtaskSpec
from tierstack.v1 import coordinator_service_pb2 as pb

#: How many answers the model may give before the decomposition fails.
ATTEMPTS = 3

_PRIORITIES = {"high": pb.PRIORITY_HIGH, "medium": pb.PRIORITY_MEDIUM, "low": pb.PRIORITY_LOW}
SUBTASKS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["subtasks"],
    "properties": {
        "subtasks": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "type": "object",
                "required": ["id", "description"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]{0,63}$"},
                    "description": {"type": "string", "minLength": 1},
                    "dependencies": {"type": "array", "items": {"type": "string"}},
                    "complexity": {"type": "integer", "minimum": 1, "maximum": 10},
                    "required_capabilities": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    "priority": {"enum": list(_PRIORITIES)},
                },
            },
        }
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(SUBTASKS_SCHEMA)
_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$")
INSTRUCTIONS = (
    "Split the user's goal into subtasks. Answer with one JSON object and nothing else, matching this "
    "JSON Schema:\n{schema}\nA subtask lists the ids of the subtasks whose results it needs in "
    "`dependencies`; there must be no cycle. Capabilities at hand: {capabilities}."
)
WORKER = "You carry out one subtask of a larger goal. Answer with its result only."


def _problems(content: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Returns the subtasks of an answer, or what is wrong with it."""
    try:
        answer = json.loads(_FENCE.sub("", content))
    except ValueError as exc:
        return [], [f"it is not JSON ({exc})"]
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or 'answer'}: {e.message}" for e in _VALIDATOR.iter_errors(answer)
    ]
    if problems:
        return [], problems
    subtasks: list[dict[str, Any]] = answer["subtasks"]
    ids = [subtask["id"] for subtask in subtasks]
    problems += [f"subtask id {i!r} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    graph = {s["id"]: set(s.get("dependencies", ())) for s in subtasks}
    problems += [f"{s}: depends on unknown subtask {d!r}" for s, deps in graph.items() for d in sorted(deps - set(ids))]
    if not problems:
        try:
            tuple(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            problems.append(f"the dependencies form a cycle: {' -> '.join(exc.args[1])}")
    return subtasks, problems


def _spec(subtask: dict[str, Any]) -> SubtaskSpec:
    dependencies = tuple(subtask.get("dependencies", ()))
    parameters: dict[str, JSON] = {"prompt": subtask["description"], "system": WORKER}
    if dependencies:  # each a whole reference: the description is the model's text, never a template
        parameters["context"] = {d: f"{{{{inputs.{d}.text}}}}" for d in dependencies}
    return SubtaskSpec(
        id=subtask["id"],
        description=subtask["description"],
        dependencies=dependencies,
        complexity=subtask.get("complexity", 3),
        required_capabilities=tuple(subtask.get("required_capabilities", ())) or ("general",),
        priority=_PRIORITIES[subtask.get("priority", "medium")],
        tool="ai.complete",
        parameters=parameters,
    )


class ModelDecomposer:
    """Asks a model, through the AI service, for a goal's subtasks.

    Args:
        ai: The AI service (cache, budgets, retries, fallbacks).
        attempts: How many answers the model may give before the decomposition fails.
    """

    def __init__(self, ai: AIService, *, attempts: int = ATTEMPTS) -> None:
        self._ai = ai
        self._attempts = attempts
        self.name = f"model:{ai.models[0]}"

    async def decompose(self, goal: str, agents: Sequence[pb.Agent], scope: Scope) -> list[SubtaskSpec]:
        """Returns the model's subtasks for ``goal``.

        Raises:
            ResourceExhaustedError: The token budget does not allow the call.
            UnavailableError: No model answered, or every answer was malformed.
        """
        capabilities = sorted({c for agent in agents for c in agent.capabilities}) or ["general"]
        system = INSTRUCTIONS.format(schema=json.dumps(SUBTASKS_SCHEMA), capabilities=", ".join(capabilities))
        messages = [Message("system", system), Message("user", goal)]
        problems: list[str] = []
        for _ in range(self._attempts):
            try:
                answer = await self._ai.complete(CompletionRequest(messages=tuple(messages), scope=scope))
            except ModelError as exc:
                if exc.reason == "TOKEN_BUDGET_EXHAUSTED":
                    raise ResourceExhaustedError(
                        [Violation("limits.max_tokens", exc.message)], reason=exc.reason
                    ) from exc
                raise UnavailableError(exc.message, reason=exc.reason) from exc
            subtasks, problems = _problems(answer.content)
            if not problems:
                return [_spec(subtask) for subtask in subtasks]
            messages += [
                Message("assistant", answer.content),
                Message("user", "That answer is not valid: " + "; ".join(problems) + ". Answer again, JSON only."),
            ]
        raise UnavailableError(
            f"the model gave no valid decomposition in {self._attempts} answers; the last: " + "; ".join(problems),
            reason="MODEL_DECOMPOSITION_INVALID",
        )
