"""The one place every request is checked before anything is stored or started: a declarative table
of bounds per message field, applied by the server interceptor to every request of every tierstack
service.

Each rule is stated in the comment of its field in protos/ ("Bounds: …"), word for word as
:meth:`Rule.describe` gives it; a test holds the two together, and another makes sure every field of
every request message has a rule (booleans and nested messages excepted: a nested message's own
fields carry the rules). The engines may assume what the table guarantees.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.message import Message

from tierstack.core.errors import Violation
from tierstack.v1 import common_pb2, coordinator_service_pb2, orchestrator_service_pb2

#: How deeply JSON values (``Struct``, ``Value``) may nest: objects and arrays inside each other. Their
#: wire form takes two or three message levels per JSON level, and every parser stops at 100 levels,
#: so a value must leave room for the messages that carry it back (events inside events).
MAX_JSON_DEPTH = 24
#: Messages larger than this are checked in a worker thread, so that the loop goes on serving.
CHECK_INLINE_BYTES = 64 << 10
#: How many violations one answer lists (a status must fit the trailers); a request with more is
#: told it has more.
MAX_VIOLATIONS = 50

_DAY = 86_400.0
_SIZE_UNITS = ((1 << 20, "MiB"), (1 << 10, "KiB"))


def _amount(count: float) -> str:
    """Returns a number as people read it: 10,000 or 0.5."""
    return f"{int(count):,}" if float(count).is_integer() else f"{count:g}"


def _bytes(count: int) -> str:
    """Returns a size as people read it: 4 MiB."""
    for unit, name in _SIZE_UNITS:
        if count >= unit and count % unit == 0:
            return f"{count // unit} {name}"
    return f"{count:,} bytes"


def _seconds(seconds: float) -> str:
    """Returns a span as people read it: 30 days, 1 hour."""
    for unit, name in ((_DAY, "day"), (3600.0, "hour"), (60.0, "minute"), (1.0, "second")):
        if seconds >= unit and seconds % unit == 0:
            count = seconds / unit
            return f"{count:g} {name}{'' if count == 1 else 's'}"
    return f"{seconds:g} seconds"


class Rule(Protocol):
    """A bound on one field's value."""

    def describe(self) -> str:
        """Returns the rule as the field's comment in protos/ states it."""
        ...

    def check(self, value: Any, field: str, found: list[Violation]) -> None:
        """Adds a violation to ``found`` for each way ``value`` breaks the rule."""
        ...


@dataclass(frozen=True, slots=True)
class Text:
    """A string of ``least`` to ``most`` characters."""

    most: int
    least: int = 0

    def describe(self) -> str:
        if self.least:
            return f"{self.least} to {_amount(self.most)} characters"
        return f"at most {_amount(self.most)} characters"

    def check(self, value: str, field: str, found: list[Violation]) -> None:
        if len(value) > self.most:
            found.append(Violation(field, f"has {len(value):,} characters; at most {_amount(self.most)} are allowed"))
        elif len(value) < self.least:
            found.append(Violation(field, "must not be empty" if self.least == 1 else f"needs {self.least} characters"))


@dataclass(frozen=True, slots=True)
class Whole:
    """A whole number from ``least`` to ``most``."""

    most: int
    least: int = 0

    def describe(self) -> str:
        return f"from {_amount(self.least)} to {_amount(self.most)}"

    def check(self, value: int, field: str, found: list[Violation]) -> None:
        if not self.least <= value <= self.most:
            found.append(Violation(field, f"must be from {_amount(self.least)} to {_amount(self.most)}, got {value}"))


@dataclass(frozen=True, slots=True)
class Real:
    """A finite number from ``least`` to ``most``."""

    most: float
    least: float = 0.0

    def describe(self) -> str:
        return f"a finite number from {_amount(self.least)} to {_amount(self.most)}"

    def check(self, value: float, field: str, found: list[Violation]) -> None:
        if not math.isfinite(value) or not self.least <= value <= self.most:
            found.append(Violation(field, f"must be {self.describe()}"))


@dataclass(frozen=True, slots=True)
class Span:
    """A ``google.protobuf.Duration`` from zero to ``most_seconds``."""

    most_seconds: float

    def describe(self) -> str:
        return f"from 0 to {_seconds(self.most_seconds)}"

    def check(self, value: duration_pb2.Duration, field: str, found: list[Violation]) -> None:
        nanos_valid = -999_999_999 <= value.nanos <= 999_999_999 and (value.seconds * value.nanos >= 0)
        seconds = value.seconds + value.nanos / 1e9
        if not nanos_valid or not 0 <= seconds <= self.most_seconds:
            found.append(Violation(field, f"must be a duration from 0 to {_seconds(self.most_seconds)}"))


@dataclass(frozen=True, slots=True)
class Declared:
    """A value that ``enum`` declares: proto3 enums carry unknown numbers unless they are refused."""

    enum: EnumDescriptor

    def describe(self) -> str:
        return "one of the declared values"

    def check(self, value: int, field: str, found: list[Violation]) -> None:
        if value not in self.enum.values_by_number:
            found.append(Violation(field, f"{value} is not a value of {self.enum.name}"))


@dataclass(frozen=True, slots=True)
class Json:
    """A ``Struct`` or ``Value`` nested at most ``MAX_JSON_DEPTH`` deep, of at most ``most_bytes``
    (0: bounded by the message size alone)."""

    most_bytes: int = 0

    def describe(self) -> str:
        size = f", at most {_bytes(self.most_bytes)}" if self.most_bytes else ""
        return f"JSON nested at most {MAX_JSON_DEPTH} deep{size}"

    def check(self, value: struct_pb2.Struct | struct_pb2.Value, field: str, found: list[Violation]) -> None:
        if self.most_bytes and value.ByteSize() > self.most_bytes:
            found.append(Violation(field, f"is {value.ByteSize():,} bytes; at most {_bytes(self.most_bytes)}"))
        elif message_depth(value) > MAX_JSON_DEPTH:
            found.append(Violation(field, f"nests deeper than {MAX_JSON_DEPTH} levels"))


@dataclass(frozen=True, slots=True)
class Wire:
    """A message of at most ``most_bytes`` in its wire form."""

    most_bytes: int

    def describe(self) -> str:
        return f"at most {_bytes(self.most_bytes)} in its wire form"

    def check(self, value: Message, field: str, found: list[Violation]) -> None:
        size = value.ByteSize()
        if size > self.most_bytes:
            found.append(Violation(field, f"is {size:,} bytes; at most {_bytes(self.most_bytes)}"))


@dataclass(frozen=True, slots=True)
class Items:
    """A repeated field of at most ``most`` items, each held to ``each`` (messages: their own rules)."""

    most: int
    each: Rule | None = None

    def describe(self) -> str:
        each = f", each {self.each.describe()}" if self.each is not None else ""
        return f"at most {_amount(self.most)} items{each}"

    def check(self, value: Any, field: str, found: list[Violation]) -> None:
        if len(value) > self.most:
            found.append(Violation(field, f"has {len(value):,} items; at most {_amount(self.most)} are allowed"))
        elif self.each is not None:
            for index, item in enumerate(value):
                self.each.check(item, f"{field}[{index}]", found)


@dataclass(frozen=True, slots=True)
class Entries:
    """A map of at most ``most`` entries, its keys held to ``key`` and its values to ``value``."""

    most: int
    key: Text
    value: Text

    def describe(self) -> str:
        return f"at most {_amount(self.most)} entries, keys {self.key.describe()}, values {self.value.describe()}"

    def check(self, value: Mapping[str, str], field: str, found: list[Violation]) -> None:
        if len(value) > self.most:
            found.append(Violation(field, f"has {len(value):,} entries; at most {_amount(self.most)} are allowed"))
            return
        for key, item in value.items():
            self.key.check(key, f"{field}.{key[: self.key.most]}", found)
            self.value.check(item, f"{field}.{key[: self.key.most]}", found)


def message_depth(value: struct_pb2.Struct | struct_pb2.Value | struct_pb2.ListValue) -> int:
    """Returns how deeply objects and arrays nest in a JSON value (a scalar is 0 deep), without
    recursion, so that no value can exhaust the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, struct_pb2.Value):
            kind = item.WhichOneof("kind")
            if kind == "struct_value":
                item = item.struct_value
            elif kind == "list_value":
                item = item.list_value
            else:
                continue
        depth += 1
        deepest = max(deepest, depth)
        children = item.fields.values() if isinstance(item, struct_pb2.Struct) else item.values
        stack.extend((child, depth) for child in children)
    return deepest


# Shared bounds, so that one kind of field is bounded alike everywhere.
ID = Text(128)
REQUIRED_ID = Text(128, least=1)
PATH = Text(1024)
NAME = Text(256)
REASON = Text(1024)
DESCRIPTION = Text(4096)
TEMPLATE = Text(65_536)
GOAL = Text(16_384)
TOKEN = Text(1024)
JSON = Json()
#: The largest workflow accepted, in wire bytes.
MAX_WORKFLOW_BYTES = 4 << 20
#: The largest inputs of a run accepted, in wire bytes.
MAX_INPUT_BYTES = 1 << 20
#: The most steps one workflow may have.
MAX_STEPS = 10_000

_LIMITS: dict[str, Rule] = {
    "max_credits": Real(1e12),
    "max_duration": Span(30 * _DAY),
    "max_tool_calls": Whole(1_000_000),
    "max_tokens": Whole(10**12),
    "max_parallelism": Whole(10_000),
    "max_depth": Whole(10),
}
_WORKFLOW_REQUEST: dict[str, Rule] = {"workflow": Wire(MAX_WORKFLOW_BYTES)}
_RUN_REQUEST: dict[str, Rule] = {
    "workflow": Wire(MAX_WORKFLOW_BYTES),
    "inputs": Json(MAX_INPUT_BYTES),
    "durability": Declared(orchestrator_service_pb2.RunDurability.DESCRIPTOR),
    "verbosity": Declared(orchestrator_service_pb2.RunVerbosity.DESCRIPTOR),
}
#: The most agents and subtasks one team is formed from: the assignment's memory grows with
#: subtasks times agents times subtasks at worst.
MAX_TEAM = 200
_AGENTS = Items(MAX_TEAM)
_TIER = Declared(common_pb2.Tier.DESCRIPTOR)
_VIEW = Declared(orchestrator_service_pb2.RunView.DESCRIPTOR)
_RUN_CONTROL: dict[str, Rule] = {"run_id": REQUIRED_ID, "reason": REASON}
# The envelope of a call a stream carries (ExecuteStream, WatchRuns).
_CARRIER: dict[str, Rule] = {
    "call": Whole(2**53 - 1, least=1),
    "trace_context": Entries(4, key=Text(64), value=Text(512)),
    "tenant": ID,
    "caller": ID,
}
_GOAL_REQUEST: dict[str, Rule] = {"goal": GOAL, "agents": _AGENTS, "max_replans": Whole(100)}

#: The bounds of every request field, by message and field name.
RULES: dict[str, dict[str, Rule]] = {
    "tierstack.v1.RequestContext": {
        "correlation_id": ID,
        "tenant_id": ID,
        "user_id": ID,
        "parent_execution_id": PATH,
    },
    "tierstack.v1.ResourceLimits": _LIMITS,
    "tierstack.v1.ToolCall": {"tool": REQUIRED_ID, "arguments": JSON},
    # Tier 3
    "tierstack.v1.ExecuteRequest": {
        "execution_id": PATH,
        "step_id": PATH,
        "tool_calls": Items(100),
        "strategy": Declared(common_pb2.Strategy.DESCRIPTOR),
        "prompt": TEMPLATE,
        "tools": Items(100, each=ID),
        "complexity": Whole(10),
    },
    "tierstack.v1.ExecuteToolRequest": {"timeout": Span(_DAY)},
    "tierstack.v1.ExecuteToolsRequest": {"calls": Items(1000), "max_concurrency": Whole(1000), "timeout": Span(_DAY)},
    "tierstack.v1.CancelExecutionRequest": {"execution_id": Text(1024, least=1)},
    "tierstack.v1.ApproveToolCallRequest": {"approval_id": REQUIRED_ID, "approver": NAME},
    "tierstack.v1.RejectToolCallRequest": {"approval_id": REQUIRED_ID, "reason": REASON},
    "tierstack.v1.GetToolStatsRequest": {"slow_threshold": Span(_DAY)},
    "tierstack.v1.ListToolsRequest": {"page_size": Whole(1000), "page_token": TOKEN},
    "tierstack.v1.ExecuteStreamRequest": _CARRIER,
    # Tier 2
    "tierstack.v1.Workflow": {
        "name": NAME,
        "steps": Items(MAX_STEPS),
        "inputs": Items(1000),
        "outputs": Entries(1000, key=ID, value=TEMPLATE),
        "variables": Entries(1000, key=ID, value=TEMPLATE),
        "description": DESCRIPTION,
    },
    "tierstack.v1.WorkflowInput": {
        "name": ID,
        "type": Declared(orchestrator_service_pb2.InputType.DESCRIPTOR),
        "default_value": JSON,
        "description": DESCRIPTION,
    },
    "tierstack.v1.RetryPolicy": {
        "max_attempts": Whole(100),
        "initial_backoff": Span(3600.0),
        "backoff_multiplier": Real(10.0),
        "max_backoff": Span(_DAY),
    },
    "tierstack.v1.WorkflowStep": {
        "id": ID,
        "name": NAME,
        "tool": ID,
        "parameters": JSON,
        "depends_on": Items(MAX_STEPS, each=ID),
        "strategy": Declared(common_pb2.Strategy.DESCRIPTOR),
        "timeout": Span(30 * _DAY),
        "when": DESCRIPTION,
        "prompt": TEMPLATE,
    },
    "tierstack.v1.OrchestrateRequest": _RUN_REQUEST,
    "tierstack.v1.StartRunRequest": {"request_id": ID, **_RUN_REQUEST},
    "tierstack.v1.WatchRunRequest": {
        "run_id": REQUIRED_ID,
        "after_sequence": Whole(10**15),
        "kinds": Items(32, each=ID),
    },
    "tierstack.v1.WatchRunsRequest": _CARRIER,
    "tierstack.v1.GetRunRequest": {"run_id": REQUIRED_ID, "view": _VIEW},
    "tierstack.v1.ListRunsRequest": {
        "page_size": Whole(1000),
        "page_token": TOKEN,
        "state": Declared(orchestrator_service_pb2.RunState.DESCRIPTOR),
        "view": _VIEW,
    },
    "tierstack.v1.CancelRunRequest": _RUN_CONTROL,
    "tierstack.v1.PauseRunRequest": _RUN_CONTROL,
    "tierstack.v1.ResumeRunRequest": {"run_id": REQUIRED_ID},
    "tierstack.v1.DeleteRunRequest": {"run_id": REQUIRED_ID},
    "tierstack.v1.ResolveVariablesRequest": {"run_id": REQUIRED_ID, "expressions": Items(1000, each=DESCRIPTION)},
    "tierstack.v1.PlanWorkflowRequest": _WORKFLOW_REQUEST,
    "tierstack.v1.ValidateWorkflowRequest": _WORKFLOW_REQUEST,
    # Tier 1
    "tierstack.v1.Agent": {
        "id": REQUIRED_ID,
        "name": NAME,
        "capabilities": Items(100, each=ID),
        "current_load": Whole(1_000_000),
        "max_concurrent_tasks": Whole(1_000_000),
    },
    "tierstack.v1.Subtask": {
        "id": REQUIRED_ID,
        "description": GOAL,
        "dependencies": Items(1000, each=ID),
        "complexity": Whole(10),
        "required_capabilities": Items(100, each=ID),
        "priority": Declared(coordinator_service_pb2.Priority.DESCRIPTOR),
        "tool": ID,
        "parameters": JSON,
    },
    "tierstack.v1.CoordinateRequest": {"request_id": ID, **_GOAL_REQUEST},
    "tierstack.v1.StartGoalRequest": {"request_id": ID, **_GOAL_REQUEST},
    "tierstack.v1.GetGoalRequest": {"goal_id": REQUIRED_ID},
    "tierstack.v1.WatchGoalRequest": {"goal_id": REQUIRED_ID, "after_sequence": Whole(10**15)},
    "tierstack.v1.ListGoalsRequest": {
        "page_size": Whole(1000),
        "page_token": TOKEN,
        "state": Declared(coordinator_service_pb2.GoalState.DESCRIPTOR),
    },
    "tierstack.v1.CancelGoalRequest": {"goal_id": REQUIRED_ID, "reason": REASON},
    "tierstack.v1.DecomposeGoalRequest": {"goal": GOAL, "agents": _AGENTS},
    "tierstack.v1.FormTeamRequest": {"agents": _AGENTS, "subtasks": Items(MAX_TEAM), "max_parallelism": Whole(10_000)},
    # Every tier
    "tierstack.v1.GetMetricsRequest": {"method_filter": NAME, "tiers": Items(3, each=_TIER)},
    "tierstack.v1.WatchMetricsRequest": {
        "interval": Span(3600.0),
        "tiers": Items(3, each=_TIER),
        "method_filter": NAME,
    },
}

_WELL_KNOWN = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.Duration", "google.protobuf.Timestamp"}
)
#: The fields that must be set (a text or a number with a least value above zero), by message.
_REQUIRED: dict[str, tuple[tuple[str, Text | Whole], ...]] = {
    name: tuple((field, rule) for field, rule in rules.items() if isinstance(rule, Text | Whole) and rule.least)
    for name, rules in RULES.items()
}


class _Full(Exception):
    """Enough violations were found to answer."""


class _Found(list[Violation]):
    def append(self, violation: Violation) -> None:
        super().append(violation)
        if len(self) >= MAX_VIOLATIONS:
            raise _Full


def check(message: Message) -> list[Violation]:
    """Returns every way ``message`` breaks the table (at most ``MAX_VIOLATIONS``, the last saying
    that there are more), each naming its field as a path such as ``workflow.steps[2].retry``."""
    found = _Found()
    try:
        _check(message, "", found)
    except _Full:
        found[-1] = Violation(found[-1].field, f"{found[-1].description} (and more problems not listed)")
    return list(found)


async def check_off_loop(message: Message) -> list[Violation]:
    """Returns :func:`check` of ``message``, worked out in a worker thread when the message is large."""
    if message.ByteSize() > CHECK_INLINE_BYTES:
        return await asyncio.to_thread(check, message)
    return check(message)


def _check(message: Message, prefix: str, found: list[Violation]) -> None:
    name = message.DESCRIPTOR.full_name
    rules = RULES.get(name, {})
    for field, required in _REQUIRED.get(name, ()):
        if not (value := getattr(message, field)):
            required.check(value, f"{prefix}{field}", found)
    for descriptor, value in message.ListFields():
        path = f"{prefix}{descriptor.name}"
        rule = rules.get(descriptor.name)
        if rule is not None:
            rule.check(value, path, found)
        if descriptor.message_type is not None and descriptor.message_type.full_name not in _WELL_KNOWN:
            if _is_map(descriptor.message_type):
                continue  # map<string, string>: its rule checked keys and values
            if descriptor.is_repeated:
                for index, item in enumerate(value):
                    _check(item, f"{path}[{index}].", found)
            else:
                _check(value, f"{path}.", found)


def _is_map(descriptor: Descriptor) -> bool:
    return descriptor.GetOptions().map_entry
