"""Goal templates: YAML files that map a goal pattern to subtasks, filled from the pattern's groups.

A template file holds ``name``, ``pattern`` (a regular expression searched in the goal, case
insensitive; its named groups become ``$name`` placeholders) and ``subtasks`` (as in
``DecomposeGoalResponse``, in the JSON mapping).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from tierstack.v1 import coordinator_service_pb2 as pb


@dataclass(frozen=True)
class GoalTemplate:
    """A pattern and the subtasks it stands for."""

    name: str
    pattern: re.Pattern[str]
    subtasks: list[dict[str, Any]]

    def instantiate(self, goal: str) -> list[pb.Subtask] | None:
        """Returns the subtasks for ``goal``, or None when the pattern does not match it."""
        match = self.pattern.search(goal)
        if match is None:
            return None
        values = {key: value for key, value in match.groupdict().items() if value is not None}
        return [json_format.ParseDict(_fill(subtask, values), pb.Subtask()) for subtask in self.subtasks]


def _fill(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        return string.Template(value).safe_substitute(values)
    if isinstance(value, dict):
        return {key: _fill(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, values) for item in value]
    return value


#: The templates that ship with tierstack.
BUILTIN_TEMPLATES = Path(__file__).parent / "builtin_templates"


def load_templates(folders: Iterable[Path]) -> list[GoalTemplate]:
    """Reads every ``*.yaml`` template in ``folders``, in order, files sorted by name.

    Raises:
        ValueError: A file is not a template.
    """
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")):
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
            try:
                template = GoalTemplate(
                    document["name"], re.compile(document["pattern"], re.IGNORECASE), list(document["subtasks"])
                )
                for subtask in template.subtasks:  # checks their shape now, not at the first match
                    json_format.ParseDict(subtask, pb.Subtask())
            except (KeyError, TypeError, re.error, json_format.ParseError) as exc:
                raise ValueError(f"{path} is not a goal template: {exc}") from exc
            found.append(template)
    return found
