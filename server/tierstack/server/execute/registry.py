"""The tool registry: named tools with JSON Schema parameters, checked before every call."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator

from tierstack.core.errors import InvalidArgumentError, Violation
from tierstack.core.values import JSON


@dataclass(slots=True)
class Meter:
    """What the calls of one request have used that the executor cannot see itself."""

    tokens: int = 0


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool call knows of the request it serves.

    Attributes:
        correlation_id: The request's id across all tiers.
        workspace_key: Names the call's workspace: the run it belongs to, else its request.
        workspaces: The folder that holds every workspace.
        meter: Where tools that call models add the tokens they used.
        tenant: The tenant the call is made for.
        token_budget: The model tokens the request may use in all; None is no limit.
    """

    correlation_id: str
    workspace_key: str
    workspaces: Path
    meter: Meter = field(default_factory=Meter)
    tenant: str = ""
    token_budget: int | None = None

    @property
    def tokens_left(self) -> int | None:
        """Returns the model tokens the request may still use; None is no limit."""
        return None if self.token_budget is None else self.token_budget - self.meter.tokens

    @property
    def workspace(self) -> Path:
        """Returns the call's own folder (not yet created); calls of one run share it."""
        key = self.workspace_key
        if not _SAFE_KEY.fullmatch(key):
            key = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.workspaces / key


ToolHandler = Callable[[dict[str, Any], ToolContext], Awaitable[JSON]]
#: A synchronous tool function, run in a worker process: picklable (a module-level function, or an
#: object that pickles as a reference to one).
WorkerFunction = Callable[[dict[str, Any], ToolContext], JSON]
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolSource(Enum):
    """Where a tool comes from."""

    BUILTIN = "builtin"
    PYTHON = "python"
    MCP = "mcp"


class ToolError(Exception):
    """A tool ran and failed in a way it understands, such as an HTTP timeout.

    Args:
        reason: A stable UPPER_SNAKE_CASE identifier, such as ``HTTP_TIMEOUT``.
        message: What went wrong, for a person.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """A callable tool.

    Attributes:
        name: The name calls refer to, such as ``json.query``.
        description: What the tool does, for people and models.
        parameters: The JSON Schema of the arguments object.
        handler: Runs the tool on the event loop with arguments that already passed the schema, and
            its context.
        function: Runs the tool in a worker process instead, where its deadline can stop it: for
            work that burns CPU or memory. A tool has a handler or a function, never both.
        source: Where the tool comes from.
        timeout_seconds: The default deadline of one call.
        credits: What one call costs against a step's ``max_credits``.
        needs_approval: Whether each call waits for ApproveToolCall before it runs.
        pure: Whether identical calls give identical results, so results may be remembered for an hour.
        critical: Whether a failing call is tried again (three tries in all) in deterministic steps.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    handler: ToolHandler | None = None
    function: WorkerFunction | None = None
    source: ToolSource = ToolSource.BUILTIN
    timeout_seconds: float = 30.0
    credits: float = 0.0
    needs_approval: bool = False
    pure: bool = False
    critical: bool = False
    _validator: Draft202012Validator = field(init=False, repr=False, compare=False)
    _accepts: Callable[[Any], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.function is None):
            raise ValueError(f"the tool {self.name!r} needs a handler or a function, not both or neither")
        Draft202012Validator.check_schema(self.parameters)
        object.__setattr__(self, "_validator", Draft202012Validator(self.parameters))
        # Compiled to Python code: every call is checked on the fast path; only a call that fails
        # it goes through jsonschema, which names every offending field.
        object.__setattr__(self, "_accepts", fastjsonschema.compile(dict(self.parameters)))

    def violations(self, arguments: Mapping[str, Any], *, prefix: str) -> list[Violation]:
        """Returns what is wrong with ``arguments``, each naming its field under ``prefix``."""
        try:
            self._accepts(arguments)
        except fastjsonschema.JsonSchemaException:
            pass
        else:
            return []
        found = []
        for error in sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.absolute_path)):
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            found.append(Violation(f"{prefix}{path}", error.message))
        return found


class ToolRegistry:
    """Holds the tools an executor can run, by name."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, tool: Tool) -> None:
        """Adds a tool; a second tool of the same name is refused."""
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        """Returns the tool ``name``, or None."""
        return self._tools.get(name)

    def tools(self) -> list[Tool]:
        """Returns every tool, ordered by name."""
        return [self._tools[name] for name in sorted(self._tools)]

    def resolve(self, name: str, arguments: Mapping[str, Any], *, field_prefix: str) -> Tool:
        """Returns the tool ``name`` after checking ``arguments`` against its schema.

        Raises:
            InvalidArgumentError: The tool is unknown or the arguments break its schema; each
                violation names the field under ``field_prefix`` (for example ``call``).
        """
        tool = self._tools.get(name)
        if tool is None:
            raise InvalidArgumentError(
                [Violation(f"{field_prefix}.tool", f"unknown tool {name!r}; ListTools names the registered tools")],
                reason="UNKNOWN_TOOL",
            )
        violations = tool.violations(arguments, prefix=f"{field_prefix}.arguments")
        if violations:
            raise InvalidArgumentError(violations, reason="INVALID_TOOL_ARGUMENTS")
        return tool
