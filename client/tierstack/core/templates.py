"""Parameter templates: ``{{inputs.city}}`` and ``{{steps.fetch.output.items[0].name}}``.

A string that is exactly one template takes the referenced value as it is (a number stays a number);
a template inside a longer string is interpolated as text. Only expressions rooted at ``inputs``,
``steps`` or ``vars`` are workflow templates: any other ``{{ … }}`` (a Jinja2 template for
``text.template``, say) reaches the tool untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tierstack.core.values import JSON, least_size

# The expression ends in a non-space character, so that it and the spaces after it never compete for
# the same characters: matching stays linear in the text (a lazy group before \s* was quadratic).
_TEMPLATE = re.compile(r"\{\{\s*((?:inputs|steps|vars)\b(?:[^{}]*[^{}\s])?)\s*\}\}")
_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*|\d+)|\[(\d+)\]")

#: The most digits an index may have (a longer one can address nothing, and Python refuses to
#: turn more than 4,300 into a number).
_MAX_INDEX_DIGITS = 18

Path = tuple[str | int, ...]


class TemplateError(Exception):
    """A template is malformed or references something that does not exist.

    Attributes:
        field: Where the template sits in the parameters, such as ``parameters.url``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def references(text: str) -> Iterator[tuple[int, int, Path]]:
    """Yields where each well-formed template of ``text`` starts and ends, with the path it names."""
    for match in _TEMPLATE.finditer(text):
        try:
            yield match.start(), match.end(), parse_path(match.group(1), field="")
        except TemplateError:
            continue


def parse_path(expression: str, *, field: str) -> Path:
    """Returns the segments of ``inputs.a.b[0]``, ``steps.fetch.output.body`` or ``vars.name``.

    Raises:
        TemplateError: The expression is not a path rooted at ``inputs``, ``steps.<id>.output`` or
            ``vars.<name>``.
    """
    text = expression.strip()
    segments: list[str | int] = []
    position = 0
    while position < len(text):
        if segments and text[position] == ".":
            position += 1
        match = _SEGMENT.match(text, position)
        if match is None:
            raise TemplateError(field, f"cannot read {{{{{expression}}}}}: expected a name or [index] at {position}")
        name, index = match.groups()
        digits = index or name
        if digits.isdigit() and len(digits) > _MAX_INDEX_DIGITS:
            raise TemplateError(field, f"cannot read {{{{{expression}}}}}: the index at {position} is too large")
        segments.append(int(index) if index is not None else int(name) if name.isdigit() else name)
        position = match.end()
    if not segments or segments[0] not in ("inputs", "steps", "vars"):
        raise TemplateError(field, f"{{{{{expression}}}}} must start with `inputs`, `steps` or `vars`")
    if segments[0] == "steps" and (len(segments) < 3 or segments[2] != "output"):
        raise TemplateError(field, f"{{{{{expression}}}}} must read `steps.<step id>.output`")
    if segments[0] == "vars" and (len(segments) < 2 or not isinstance(segments[1], str)):
        raise TemplateError(field, f"{{{{{expression}}}}} must read `vars.<name>`")
    return tuple(segments)


def templates(value: JSON, field: str) -> Iterator[tuple[str, Path]]:
    """Yields (field, path) for every template in a parameter value, checking each one's syntax."""
    if isinstance(value, str):
        for match in _TEMPLATE.finditer(value):
            yield field, parse_path(match.group(1), field=field)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from templates(item, f"{field}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from templates(item, f"{field}[{index}]")


def lookup(scope: Mapping[str, Any], path: Path, field: str) -> JSON:
    """Returns the value at ``path`` inside ``scope``.

    Raises:
        TemplateError: The path does not exist.
    """
    current: Any = scope
    for depth, segment in enumerate(path):
        try:
            current = current[segment]
        except (KeyError, IndexError, TypeError):
            raise TemplateError(field, f"{format_path(path[: depth + 1])} does not exist") from None
    result: JSON = current
    return result


def format_path(path: Path) -> str:
    """Returns a path as text, such as ``steps.fetch.output.items[0]``."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path).lstrip(".")


Resolver = Callable[[Path, str], JSON]


class TooLargeError(TemplateError):
    """Templates would fill in more than their budget allows."""


class Budget:
    """The bytes one rendering may fill in: every value a template takes counts, before it is
    copied, so a template that repeats a large output many times fails instead of filling memory.

    Args:
        most: The bytes (of the values' wire form, about) the rendering may fill in.
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._left = most

    def spend(self, value: JSON, field: str) -> None:
        """Counts ``value`` against the budget.

        Raises:
            TemplateError: The budget is spent.
        """
        self._left -= least_size(value, self._left)
        if self._left < 0:
            raise TooLargeError(field, f"the templates fill in more than {self.most} bytes")


def render(value: JSON, resolve: Resolver, field: str, budget: Budget) -> JSON:
    """Returns ``value`` with every template replaced by ``resolve(path, field)``, filling in at most
    what ``budget`` allows.

    Raises:
        TemplateError: A template is malformed, cannot be resolved, or the budget is spent.
    """
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value)
        if whole is not None:
            found = resolve(parse_path(whole.group(1), field=field), field)
            budget.spend(found, field)
            return found

        def interpolate(match: re.Match[str]) -> str:
            found = resolve(parse_path(match.group(1), field=field), field)
            budget.spend(found, field)
            return found if isinstance(found, str) else json.dumps(found)

        return _TEMPLATE.sub(interpolate, value)
    if isinstance(value, dict):
        return {key: render(item, resolve, f"{field}.{key}", budget) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, resolve, f"{field}[{index}]", budget) for index, item in enumerate(value)]
    return value
