"""Hostile requests for every RPC the tiers serve, built by hypothesis from the contract's descriptors.

Each request is one of three kinds:

- ``random``: a message of the method's input type with a random subset of its fields set, recursively
  to a bounded depth: extreme numbers, long and odd strings, unknown enum numbers, Struct and Value
  trees nested past the decoder's limit, Durations and Timestamps out of range, repeated fields and
  maps with many items.
- ``mutated``: a valid request (a small workflow of real tools, a run id that exists, an agent that
  can do the work) with one field, anywhere in it, replaced by a hostile value, so that the request
  gets past the first check and reaches the code behind it.
- ``raw``: bytes no protobuf library would send: random bytes, a valid request cut short, invalid
  UTF-8 in a string field, unknown field numbers and wire types, groups nested thousands deep.

Every request is kept as bytes and sent with identity serialisers, so the servers' decoding is fuzzed
as well as their handlers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tierstack.client.defaults import TIERS
from tierstack.core.values import JSON, to_duration, to_struct, to_value
from tierstack.v1 import (
    common_pb2,
    coordinator_service_pb2,
    executor_service_pb2,
    monitor_service_pb2,
    orchestrator_service_pb2,
)

Strategy = st.SearchStrategy

#: Whole numbers at and around the edges of every integer type.
INT32_EDGES = (0, 1, -1, 2, 255, 65_536, 2**31 - 1, -(2**31), -(2**31 - 1))
INT64_EDGES = (*INT32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), -(2**63 - 1))
UINT32_EDGES = (0, 1, 2**31, 2**32 - 1)
UINT64_EDGES = (*UINT32_EDGES, 2**63, 2**64 - 1)
#: Floating-point values that break arithmetic, comparisons and conversions.
FLOAT_EDGES = (math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, -1.0, 1e308, -1e308, 5e-324, 1e-300, 2.0**63)
#: Enum numbers no enum of the contract declares (proto3 enums are open: any int32 goes on the wire).
UNKNOWN_ENUMS = (-1, 42, 77, 99, 1000, 2**31 - 1, -(2**31))
#: Strings that mean something to a parser, a template engine, a file system or a terminal.
ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "\r\n\r\n",
    "\t\v\f",
    "\u202eevil",
    "\u200b",
    "\ufeff",
    "\U0001d518\U0001d52b\U0001d526",
    "😀" * 3,
    "ß" * 5,
    # Paths out of the workspace; the servers may run as root, so none names a file worth harming.
    "../../../../tmp/tierstack-fuzz-escaped",
    "/tmp/tierstack-fuzz-escaped",
    "/proc/self/environ",
    "~/.ssh/id_rsa",
    "C:\\Windows\\system32",
    "\\\\server\\share",
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:1/",
    "http://[::1]:0/",
    "{{inputs.x}}",
    "{{ steps.a.output }}",
    "{{vars.y}}",
    "{{steps.missing.output.a[99999999]}}",
    "{{",
    "}}",
    "{%",
    "{% for i in range(3) %}{{ i }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ x.pop() }}",
    "{% raw %}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "[@,@,@,@]|[@,@,@,@]|[@,@,@,@]|[@,@,@,@]|[@,@,@,@]|[@,@,@,@]",
    "*",
    "@",
    "length(@)",
    "a.b.c[0]",
    "[?",
    "NaN",
    "-1",
    "1e309",
    "9223372036854775808",
    "'; DROP TABLE runs; --",
    "%s%s%s%n",
    "{0}{1}",
    "null",
    "true",
    "STEP_STATE_RUNNING",
    "run/step/1",
    "a" * 129,
)
#: Lengths of long strings, the longest past the 4 MiB default message size; repeated to weight the
#: draw towards the cheaper ones.
LONG_LENGTHS = (1_000,) * 16 + (10_000,) * 8 + (100_000,) * 4 + (1_000_000, 5_000_000)
#: Item counts of repeated fields and maps that are long without being drawn item by item.
MANY = (100, 1_000, 10_000)
#: Nesting depths of Struct and Value trees: around the depth where recursion used to fail (33),
#: and around and past the protobuf decoder's limit of 100 messages.
DEEP = (16, 32, 33, 34, 49, 50, 51, 64, 99, 100, 101, 150, 300)
#: Byte strings that are not UTF-8: a stray byte, an overlong encoding, a surrogate, a code point past
#: U+10FFFF, continuation bytes alone.
INVALID_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ok\xfe", b"\xf4\x90\x80\x80", b"\x80" * 64)
#: How deeply messages nest inside each other in a random request.
MAX_DEPTH = 4
#: The largest request sent; a larger draw is discarded so that one call stays cheap to build and send.
MAX_PAYLOAD = 6 << 20

_WELL_KNOWN_JSON = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC the tiers serve.

    Attributes:
        path: The method's full path, such as ``/tierstack.v1.ExecutorService/ExecuteTool``.
        input: The descriptor of its request message.
        streaming: Whether it streams its responses.
        tiers: The tiers that serve it.
        output: The descriptor of its response message.
        bidirectional: Whether it streams its requests too (each case is then one message on it).
    """

    path: str
    input: Descriptor
    streaming: bool
    tiers: tuple[str, ...]
    output: Descriptor
    bidirectional: bool = False

    @property
    def name(self) -> str:
        """Returns ``Service/Method`` without the package, for reports."""
        return self.path.rsplit(".", 1)[-1]


def _methods() -> Iterator[Method]:
    served = (
        (executor_service_pb2.DESCRIPTOR.services_by_name["ExecutorService"], ("execute",)),
        (orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"], ("orchestrate",)),
        (coordinator_service_pb2.DESCRIPTOR.services_by_name["CoordinatorService"], ("coordinate",)),
        (monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"], TIERS),
        (health_pb2.DESCRIPTOR.services_by_name["Health"], TIERS),
    )
    for service, tiers in served:
        for method in service.methods:
            assert method.server_streaming or not method.client_streaming, "tierstack serves no client-streaming RPCs"
            path = f"/{service.full_name}/{method.name}"
            yield Method(
                path, method.input_type, method.server_streaming, tiers, method.output_type, method.client_streaming
            )


#: Every RPC of the contract, Monitor's on every tier, and the standard health service.
METHODS: tuple[Method, ...] = tuple(_methods())


@dataclass(frozen=True)
class Known:
    """What the running tiers already hold, so that valid requests can name it.

    Attributes:
        tools: Each tool Execute offers, by name, with the JSON Schema of its arguments.
        run_ids: Runs Orchestrate holds.
        url: An HTTP URL the ``http.request`` tool may fetch.
        goal_ids: Goals Coordinate holds.
    """

    tools: Mapping[str, Mapping[str, Any]]
    run_ids: tuple[str, ...]
    url: str
    goal_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Case:
    """One request: the path of its method, the tier it goes to, how it was made, and its bytes."""

    method: str
    tier: str
    kind: str
    payload: bytes


def _example_arguments(url: str) -> dict[str, dict[str, JSON]]:
    """Returns arguments each built-in tool accepts and runs with quickly."""
    return {
        "core.echo": {"value": {"text": "{{inputs.x}}", "items": [1, 2.5, True, None]}},
        "core.sleep": {"seconds": 0.01},
        "ai.complete": {"prompt": "Say hello", "max_tokens": 8, "context": {"facts": "otters {{inputs.x}}"}},
        "files.write": {"path": "notes/a.txt", "content": "hello"},
        "files.read": {"path": "notes/a.txt", "max_bytes": 100},
        "text.template": {"template": "Hello {{ name }}", "variables": {"name": "fuzz"}},
        "json.query": {"data": {"a": [1, 2, 3]}, "expression": "a[1]"},
        "http.request": {"url": f"{url}/ok", "method": "GET", "timeout_seconds": 1},
    }


def _hostile_arguments(url: str) -> dict[str, tuple[dict[str, JSON], ...]]:
    """Returns, for each built-in tool, arguments its schema accepts that ask for too much: work without
    end, memory without bound, a way out of its sandbox."""
    deep: JSON = "bottom"
    for _ in range(40):  # lists in lists, past the depth where converting them used to fail (33)
        deep = [deep]
    return {
        "core.echo": ({"value": "x" * 2_000_000}, {"value": deep}),
        "core.sleep": ({"seconds": 3600}, {"seconds": 5e-324}),
        "ai.complete": (
            {"prompt": "x" * 200_000, "max_tokens": 2**31 - 1},
            {"prompt": "hi", "model": "../../x"},
            {"prompt": "hi", "context": {f"part {n}": "x" * 5_000 for n in range(200)}},
            {"prompt": "hi", "context": {"x" * 128: "{{inputs.x}}" * 1_000}},
        ),
        "files.write": (
            {"path": "../../../../tmp/tierstack-fuzz-escaped", "content": "x"},
            {"path": "big.txt", "content": "x" * 1_000_000, "append": True},
        ),
        "files.read": ({"path": "/proc/self/environ"}, {"path": "big.txt", "max_bytes": 64 << 20}),
        "text.template": (
            {"template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"},
            {"template": "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}"},
            {"template": "{{ 'a' * 100000000 }}"},
            {"template": "{{ x.pop() }}{{ x }}", "variables": {"x": [1, 2]}},
            {"template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
        ),
        "json.query": (
            {"data": list(range(32)), "expression": "|".join(["[@,@,@,@]"] * 10)},
            {"data": {"a": "x" * 100_000}, "expression": "[a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a]"},
        ),
        "http.request": (
            {"url": "http://169.254.169.254/latest/meta-data/", "timeout_seconds": 1},
            {"url": f"{url}/ok", "max_bytes": 64 << 20, "headers": {"X-Test": "a\r\nInjected: 1"}},
            {"url": f"{url}/ok", "method": "POST", "body": "x" * 3_000_000, "timeout_seconds": 300},
        ),
    }


class Shapes:
    """The hypothesis strategies of hostile requests for the tiers that hold ``known``."""

    def __init__(self, known: Known, *, skip: Collection[str] = ()) -> None:
        self._known = known
        self._examples = _example_arguments(known.url)
        self._hostile = _hostile_arguments(known.url)
        self._messages: dict[tuple[str, int, bool], Strategy[Message]] = {}
        self._fields: dict[tuple[str, int, bool], Strategy[Any]] = {}
        self._text = {small: self._strings(small) for small in (True, False)}
        self._json = {small: self._json_values(small) for small in (True, False)}
        self.tool_calls = self._tool_calls()
        self.workflows = self._workflows()
        self._valid = self._valid_requests()
        #: Requests of every method but those ``skip`` names (as :attr:`Method.name`).
        self.cases: Strategy[Case] = self._cases([method for method in METHODS if method.name not in skip])

    # -- scalars -------------------------------------------------------------------------------------

    def _strings(self, small: bool) -> Strategy[str]:
        words = [*self._known.tools, *self._known.run_ids, *TIERS]
        branches: list[Strategy[str]] = [
            st.sampled_from(ODD_STRINGS),
            st.text(max_size=24),
            st.sampled_from(words) if words else st.just("x"),
        ]
        if not small:
            chunks = st.sampled_from(("a", "é", "\x00", "{{", "\U0001d518", "/", "[@,@]|"))
            branches.append(st.builds(lambda chunk, n: (chunk * n)[:n], chunks, st.sampled_from(LONG_LENGTHS)))
        return st.one_of(branches)

    def _scalar(self, field: FieldDescriptor, small: bool) -> Strategy[Any]:
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self._text[small]
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64)
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            declared = [value.number for value in field.enum_type.values]
            return st.one_of(st.sampled_from(declared), st.sampled_from(UNKNOWN_ENUMS))
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            floats = st.floats(width=64) if kind == FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
            return st.one_of(st.sampled_from(FLOAT_EDGES), floats)
        bits, signed = _INTEGERS[kind]
        edges = (INT64_EDGES if signed else UINT64_EDGES) if bits == 64 else (INT32_EDGES if signed else UINT32_EDGES)
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        return st.one_of(st.sampled_from([edge for edge in edges if low <= edge <= high]), st.integers(low, high))

    # -- JSON: Struct, Value, ListValue --------------------------------------------------------------

    def _json_values(self, small: bool) -> Strategy[JSON]:
        leaves: Strategy[JSON] = st.one_of(
            st.none(),
            st.booleans(),
            st.sampled_from(FLOAT_EDGES),
            st.floats(),
            st.sampled_from(INT64_EDGES),
            self._text[small],
        )
        return st.recursive(
            leaves,
            lambda children: st.one_of(
                st.lists(children, max_size=4), st.dictionaries(self._text[True], children, max_size=4)
            ),
            max_leaves=12,
        )

    def _value(self, small: bool) -> Strategy[struct_pb2.Value]:
        deep = st.builds(_deep_value, st.sampled_from(DEEP), st.booleans())
        return st.one_of(self._json[small].map(to_value), deep)

    def _well_known(self, descriptor: Descriptor, small: bool) -> Strategy[Message]:
        value = self._value(small)
        if descriptor.full_name == "google.protobuf.Value":
            return value
        if descriptor.full_name == "google.protobuf.ListValue":
            return st.lists(value, max_size=4).map(lambda items: struct_pb2.ListValue(values=items))
        return st.one_of(
            st.dictionaries(self._text[True], self._json[small], max_size=6).map(to_struct),
            value.map(lambda inner: struct_pb2.Struct(fields={"k": inner})),
        )

    # -- messages ------------------------------------------------------------------------------------

    def message(self, descriptor: Descriptor, depth: int = 0, small: bool = False) -> Strategy[Message]:
        """Returns messages of ``descriptor``'s type with a random subset of their fields set; message
        fields deeper than :data:`MAX_DEPTH` stay unset, and ``small`` leaves out long strings and
        many-item fields (for the items of a many-item field)."""
        key = (descriptor.full_name, depth, small)
        if key not in self._messages:
            if descriptor.full_name in _WELL_KNOWN_JSON:
                self._messages[key] = self._well_known(descriptor, small)
            else:
                self._messages[key] = self._build_message(descriptor, depth, small)
        return self._messages[key]

    def _build_message(self, descriptor: Descriptor, depth: int, small: bool) -> Strategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        fields = [f for f in descriptor.fields if f.message_type is None or depth < MAX_DEPTH or _map_entry(f)]
        if not fields:
            return st.builds(cls)
        values = {f.name: self.field(f, depth, small) for f in fields}

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = cls()
            for f in draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields))):
                _assign(message, f, draw(values[f.name]))
            return message

        return build()

    def field(self, field: FieldDescriptor, depth: int, small: bool = False) -> Strategy[Any]:
        """Returns hostile values of ``field``: a list for a repeated field, a dict for a map."""
        key = (field.full_name, depth, small)
        if key not in self._fields:
            self._fields[key] = self._build_field(field, depth, small)
        return self._fields[key]

    def _build_field(self, field: FieldDescriptor, depth: int, small: bool) -> Strategy[Any]:
        entry = _map_entry(field)
        if entry is not None:
            key_field, value_field = entry
            maps = st.dictionaries(
                self._scalar(key_field, True), self._single(value_field, depth + 1, small), max_size=5
            )
            if small:
                return maps
            if key_field.type == FieldDescriptor.TYPE_STRING:
                small_value = self._single(value_field, MAX_DEPTH, True)
                many = st.builds(lambda v, n: {f"k{i}": v for i in range(n)}, small_value, st.sampled_from(MANY))
                maps = st.one_of(maps, many)
            return maps
        single = self._single(field, depth + 1, small)
        if not field.is_repeated:
            return single
        few = st.lists(single, max_size=4)
        if small:
            return few
        item = self._single(field, MAX_DEPTH, True)
        return st.one_of(few, st.builds(lambda v, n: [v] * n, item, st.sampled_from(MANY)))

    def _single(self, field: FieldDescriptor, depth: int, small: bool) -> Strategy[Any]:
        if field.message_type is not None:
            return self.message(field.message_type, depth, small)
        return self._scalar(field, small)

    # -- valid requests, and one field of them made hostile ------------------------------------------

    def _tool_calls(self) -> Strategy[common_pb2.ToolCall]:
        """Returns calls of a tool Execute offers: with arguments it accepts, with one of them (or an extra
        one) replaced by a hostile JSON value, or with arguments that ask the tool for too much."""
        names = sorted(self._known.tools) or ["core.echo"]

        @st.composite
        def call(draw: st.DrawFn) -> common_pb2.ToolCall:
            name = draw(st.sampled_from(names))
            arguments: dict[str, JSON] = dict(self._examples.get(name, {}))
            how = draw(st.sampled_from(("valid", "hostile value", "too much")))
            if how == "too much" and name in self._hostile:
                arguments = draw(st.sampled_from(self._hostile[name]))
            elif how == "hostile value":
                properties = [*sorted(self._known.tools.get(name, {}).get("properties", {})), "extra"]
                arguments[draw(st.sampled_from(properties))] = draw(self._json[False])
            return common_pb2.ToolCall(tool=name, arguments=to_struct(arguments))

        return call()

    def _workflows(self) -> Strategy[orchestrator_service_pb2.Workflow]:
        """Returns small valid-looking workflows: a chain of one to three tool steps with an input."""
        pb = orchestrator_service_pb2

        @st.composite
        def build(draw: st.DrawFn) -> pb.Workflow:
            calls = draw(st.lists(self.tool_calls, min_size=1, max_size=3))
            steps = [
                pb.WorkflowStep(
                    id=f"s{i}",
                    tool=call.tool,
                    parameters=call.arguments,
                    depends_on=[f"s{i - 1}"] if i else [],
                    timeout=to_duration(2.0),
                    retry=pb.RetryPolicy(
                        max_attempts=2,
                        initial_backoff=to_duration(0.01),
                        backoff_multiplier=2.0,
                        max_backoff=to_duration(0.1),
                    ),
                )
                for i, call in enumerate(calls)
            ]
            return pb.Workflow(
                name="fuzz",
                steps=steps,
                inputs=[pb.WorkflowInput(name="x", type=pb.INPUT_TYPE_STRING, default_value=to_value("hello"))],
                outputs={"result": f"{{{{steps.s{len(steps) - 1}.output}}}}"},
            )

        return build()

    def _agents(self) -> Strategy[list[coordinator_service_pb2.Agent]]:
        capabilities = st.lists(st.sampled_from(("http", "analysis", "writing", "research", "general")), max_size=3)
        agent = st.builds(
            lambda n, caps, load, most: coordinator_service_pb2.Agent(
                id=f"agent-{n}", name=f"Agent {n}", capabilities=caps, current_load=load, max_concurrent_tasks=most
            ),
            st.integers(0, 9),
            capabilities,
            st.integers(0, 2),
            st.integers(1, 4),
        )
        return st.lists(agent, min_size=1, max_size=4, unique_by=lambda a: a.id)

    def _subtasks(self) -> Strategy[list[coordinator_service_pb2.Subtask]]:
        pb = coordinator_service_pb2

        @st.composite
        def build(draw: st.DrawFn) -> list[pb.Subtask]:
            calls = draw(st.lists(self.tool_calls, min_size=1, max_size=4))
            return [
                pb.Subtask(
                    id=f"t{i}",
                    description=f"subtask {i}",
                    dependencies=[f"t{i - 1}"] if i else [],
                    complexity=draw(st.integers(1, 10)),
                    required_capabilities=draw(st.lists(st.sampled_from(("http", "analysis", "writing")), max_size=2)),
                    priority=draw(st.sampled_from((pb.PRIORITY_HIGH, pb.PRIORITY_MEDIUM, pb.PRIORITY_LOW))),
                    tool=call.tool,
                    parameters=call.arguments,
                )
                for i, call in enumerate(calls)
            ]

        return build()

    def _valid_requests(self) -> dict[str, Strategy[Message]]:
        """Returns, by method path, valid requests (an empty request is valid for the rest)."""
        executor, orchestrator = executor_service_pb2, orchestrator_service_pb2
        coordinator, monitor = coordinator_service_pb2, monitor_service_pb2
        runs = st.sampled_from(self._known.run_ids) if self._known.run_ids else st.just("")
        goals = st.sampled_from(self._known.goal_ids) if self._known.goal_ids else st.just("")
        views = st.sampled_from(list(orchestrator_service_pb2.RunView.values()))
        seconds = st.sampled_from((0.05, 0.2, 1.0)).map(to_duration)
        goal = st.sampled_from(
            (f"Summarise the page at {self._known.url}/ok", "Analyse the numbers and write a report", "hello")
        )
        tiers = st.lists(
            st.sampled_from((common_pb2.TIER_COORDINATE, common_pb2.TIER_ORCHESTRATE, common_pb2.TIER_EXECUTE))
        )
        services = st.sampled_from(("", *{method.path.split("/")[1] for method in METHODS}))
        context = st.builds(common_pb2.RequestContext, tenant_id=st.sampled_from(("", "acme")))
        ex, orch, co = (
            "/tierstack.v1.ExecutorService/",
            "/tierstack.v1.OrchestratorService/",
            "/tierstack.v1.CoordinatorService/",
        )
        execute = st.builds(
            executor.ExecuteRequest,
            context=context,
            execution_id=st.sampled_from(("run-1/s0/1", "x")),
            step_id=st.just("s0"),
            tool_calls=st.lists(self.tool_calls, min_size=1, max_size=3),
            strategy=st.sampled_from(list(common_pb2.Strategy.values())),
            limits=st.just(common_pb2.ResourceLimits(max_tool_calls=5, max_parallelism=2)),
            complexity=st.integers(0, 10),
        )
        cancel = st.builds(executor.CancelExecutionRequest, execution_id=st.sampled_from(("run-1/s0/1", "x")))
        watch = st.builds(orchestrator.WatchRunRequest, run_id=runs, after_sequence=st.integers(0, 5))
        return {
            ex + "Execute": execute,
            ex + "ExecuteStream": st.one_of(
                st.builds(executor.ExecuteStreamRequest, call=st.integers(1, 3), execute=execute),
                st.builds(executor.ExecuteStreamRequest, call=st.integers(1, 3), cancel=cancel),
            ),
            ex + "ExecuteTool": st.builds(
                executor.ExecuteToolRequest, context=context, call=self.tool_calls, timeout=seconds
            ),
            ex + "ExecuteTools": st.builds(
                executor.ExecuteToolsRequest,
                calls=st.lists(self.tool_calls, min_size=1, max_size=4),
                max_concurrency=st.integers(0, 4),
                timeout=seconds,
            ),
            ex + "GetToolStats": st.builds(executor.GetToolStatsRequest, slow_threshold=seconds),
            ex + "ListTools": st.builds(executor.ListToolsRequest, page_size=st.integers(0, 100)),
            ex + "CancelExecution": cancel,
            orch + "Orchestrate": st.builds(orchestrator.OrchestrateRequest, context=context, workflow=self.workflows),
            orch + "StartRun": st.builds(
                orchestrator.StartRunRequest,
                request_id=st.sampled_from(("", "req-1", "req-2")),
                workflow=self.workflows,
            ),
            orch + "WatchRun": watch,
            orch + "WatchRuns": st.builds(
                orchestrator.WatchRunsRequest, call=st.integers(1, 3), tenant=st.sampled_from(("", "acme")), watch=watch
            ),
            orch + "GetRun": st.builds(orchestrator.GetRunRequest, run_id=runs, view=views),
            orch + "ListRuns": st.builds(
                orchestrator.ListRunsRequest,
                page_size=st.integers(0, 20),
                state=st.sampled_from(list(orchestrator.RunState.values())),
                view=views,
            ),
            orch + "DeleteRun": st.builds(orchestrator.DeleteRunRequest, run_id=runs),
            orch + "CancelRun": st.builds(orchestrator.CancelRunRequest, run_id=runs, reason=st.just("fuzz")),
            orch + "PauseRun": st.builds(orchestrator.PauseRunRequest, run_id=runs, reason=st.just("fuzz")),
            orch + "ResumeRun": st.builds(orchestrator.ResumeRunRequest, run_id=runs),
            orch + "ResolveVariables": st.builds(
                orchestrator.ResolveVariablesRequest,
                run_id=runs,
                expressions=st.lists(
                    st.sampled_from(("inputs.x", "steps.s0.output", "vars.y", "{{inputs.x}}")), max_size=3
                ),
            ),
            orch + "PlanWorkflow": st.builds(orchestrator.PlanWorkflowRequest, workflow=self.workflows),
            orch + "ValidateWorkflow": st.builds(orchestrator.ValidateWorkflowRequest, workflow=self.workflows),
            co + "Coordinate": st.builds(
                coordinator.CoordinateRequest,
                context=context,
                goal=goal,
                agents=self._agents(),
                max_replans=st.integers(0, 2),
                request_id=st.sampled_from(("", "goal-req-1")),
                cancel_on_disconnect=st.booleans(),
            ),
            co + "StartGoal": st.builds(
                coordinator.StartGoalRequest,
                request_id=st.sampled_from(("", "goal-req-1", "goal-req-2")),
                context=context,
                goal=goal,
                agents=self._agents(),
                max_replans=st.integers(0, 2),
            ),
            co + "GetGoal": st.builds(coordinator.GetGoalRequest, goal_id=goals),
            co + "WatchGoal": st.builds(coordinator.WatchGoalRequest, goal_id=goals, after_sequence=st.integers(0, 5)),
            co + "ListGoals": st.builds(
                coordinator.ListGoalsRequest,
                page_size=st.integers(0, 20),
                state=st.sampled_from(list(coordinator.GoalState.values())),
            ),
            co + "CancelGoal": st.builds(coordinator.CancelGoalRequest, goal_id=goals, reason=st.just("fuzz")),
            co + "DecomposeGoal": st.builds(coordinator.DecomposeGoalRequest, goal=goal, agents=self._agents()),
            co + "FormTeam": st.builds(coordinator.FormTeamRequest, agents=self._agents(), subtasks=self._subtasks()),
            "/tierstack.v1.MonitorService/GetMetrics": st.builds(monitor.GetMetricsRequest, tiers=tiers),
            "/tierstack.v1.MonitorService/WatchMetrics": st.builds(
                monitor.WatchMetricsRequest, interval=seconds, tiers=tiers
            ),
            "/grpc.health.v1.Health/Check": st.builds(health_pb2.HealthCheckRequest, service=services),
            "/grpc.health.v1.Health/Watch": st.builds(health_pb2.HealthCheckRequest, service=services),
        }

    def valid(self, method: Method) -> Strategy[Message]:
        """Returns valid requests of ``method``."""
        valid = self._valid.get(method.path)
        return valid if valid is not None else st.builds(message_factory.GetMessageClass(method.input))

    def mutated(self, method: Method) -> Strategy[Message]:
        """Returns valid requests of ``method`` with one field, at any depth, replaced by a hostile value."""
        valid = self.valid(method)

        @st.composite
        def mutate(draw: st.DrawFn) -> Message:
            message = draw(valid)
            self._mutate(draw, message, 0)
            return message

        return mutate()

    def _mutate(self, draw: st.DrawFn, message: Message, depth: int) -> None:
        fields: tuple[FieldDescriptor, ...] = tuple(cast("Sequence[FieldDescriptor]", message.DESCRIPTOR.fields))
        if not fields:
            return
        field = draw(st.sampled_from(fields))
        if _is_message(field) and _map_entry(field) is None:
            current = getattr(message, field.name)
            children = list(current) if field.is_repeated else [current] if message.HasField(field.name) else []
            if children and depth < MAX_DEPTH and draw(st.booleans()):
                self._mutate(draw, draw(st.sampled_from(children)), depth + 1)
                return
        message.ClearField(field.name)
        _assign(message, field, draw(self.field(field, depth + 1)))

    # -- bytes no client library sends -----------------------------------------------------------------

    def raw(self, method: Method) -> Strategy[bytes]:
        """Returns malformed encodings of ``method``'s request."""
        valid = self.valid(method).map(lambda message: message.SerializeToString())
        branches: list[Strategy[bytes]] = [
            st.binary(max_size=256),
            valid.flatmap(lambda data: st.integers(0, max(len(data) - 1, 0)).map(lambda cut: data[:cut])),
            st.builds(lambda data, extra: data + extra, valid, _unknown_field()),
            st.builds(_deep_groups, st.sampled_from((64, 101, 1_000, 100_000))),
        ]
        strings = [path for path, _ in _paths(method.input, lambda f: f.type == FieldDescriptor.TYPE_STRING)]
        if strings:
            branches.append(st.builds(_nested, st.sampled_from(strings), st.sampled_from(INVALID_UTF8)))
        trees = list(_paths(method.input, lambda f: f.message_type is not None and not _is_message(f)))
        if trees:
            branches.append(st.builds(_deep_tree, st.sampled_from(trees), st.sampled_from(DEEP)))
        return st.one_of(branches)

    def _cases(self, methods: Sequence[Method]) -> Strategy[Case]:
        makers: dict[str, dict[str, Strategy[bytes]]] = {}
        for method in methods:
            makers[method.path] = {
                "random": self.message(method.input).map(lambda message: message.SerializeToString()),
                "mutated": self.mutated(method).map(lambda message: message.SerializeToString()),
                "raw": self.raw(method),
            }

        @st.composite
        def case(draw: st.DrawFn) -> Case:
            method = draw(st.sampled_from(methods))
            kind = draw(st.sampled_from(("random", "mutated", "mutated", "raw")))
            payload = draw(makers[method.path][kind])
            assume(len(payload) <= MAX_PAYLOAD)
            return Case(method.path, draw(st.sampled_from(method.tiers)), kind, payload)

        return case()


def generate(cases: Strategy[Case], count: int, seed: int) -> list[Case]:
    """Returns ``count`` cases drawn by hypothesis from ``cases``; the same seed draws the same cases.

    Hypothesis runs only its generate phase here: a case is judged by the servers' answer, after it was
    drawn, so there is nothing to shrink; the failing requests are reported by their bytes instead."""
    drawn: list[Case] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn[:count]


# -- helpers -----------------------------------------------------------------------------------------

_INTEGERS = {
    FieldDescriptor.TYPE_INT32: (32, True),
    FieldDescriptor.TYPE_SINT32: (32, True),
    FieldDescriptor.TYPE_SFIXED32: (32, True),
    FieldDescriptor.TYPE_INT64: (64, True),
    FieldDescriptor.TYPE_SINT64: (64, True),
    FieldDescriptor.TYPE_SFIXED64: (64, True),
    FieldDescriptor.TYPE_UINT32: (32, False),
    FieldDescriptor.TYPE_FIXED32: (32, False),
    FieldDescriptor.TYPE_UINT64: (64, False),
    FieldDescriptor.TYPE_FIXED64: (64, False),
}


def _map_entry(field: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor] | None:
    """Returns the key and value fields of a map field; None for any other field."""
    entry = field.message_type
    if entry is None or not entry.GetOptions().map_entry:
        return None
    return entry.fields_by_name["key"], entry.fields_by_name["value"]


def _is_message(field: FieldDescriptor) -> bool:
    """Tells whether ``field`` holds a message other than a JSON one (Struct, Value, ListValue)."""
    return field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN_JSON


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Sets ``field`` of ``message`` to ``value`` (a list for a repeated field, a dict for a map)."""
    target = getattr(message, field.name)
    entry = _map_entry(field)
    if entry is not None:
        if entry[1].message_type is not None:
            for key, item in value.items():
                target[key].CopyFrom(item)
        else:
            target.update(value)
    elif field.is_repeated and field.message_type is not None:
        for item in value:
            target.add().CopyFrom(item)  # extend() would copy by parsing, which refuses deep trees
    elif field.is_repeated:
        target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _deep_value(depth: int, lists: bool) -> struct_pb2.Value:
    """Returns a Value nested ``depth`` lists (or structs) deep around a string."""
    root = struct_pb2.Value()
    current = root
    for _ in range(depth):
        current = current.list_value.values.add() if lists else current.struct_value.fields["k"]
    current.string_value = "bottom"
    return root


def _paths(
    descriptor: Descriptor, wanted: Callable[[FieldDescriptor], bool], depth: int = 3
) -> Iterator[tuple[tuple[int, ...], FieldDescriptor]]:
    """Yields the field-number paths, at most ``depth`` long, from ``descriptor`` to the fields ``wanted``
    picks, with the field each ends at; a map's entries are messages of key (1) and value (2), so paths
    go through them too."""
    for field in descriptor.fields:
        if wanted(field):
            yield (field.number,), field
        elif field.message_type is not None and _is_message(field) and depth > 1:
            for rest, end in _paths(field.message_type, wanted, depth - 1):
                yield (field.number, *rest), end


def _varint(number: int) -> bytes:
    number &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _nested(path: Sequence[int], data: bytes) -> bytes:
    """Returns ``data`` as the length-delimited field at the end of ``path``, each step an embedded message."""
    for number in reversed(path):
        data = _tag(number, 2) + _varint(len(data)) + data
    return data


def _deep_tree(tree: tuple[tuple[int, ...], FieldDescriptor], depth: int) -> bytes:
    """Returns a request whose Struct, Value or ListValue field (at the end of the path ``tree`` gives)
    holds lists nested ``depth`` deep."""
    path, field = tree
    assert field.message_type is not None
    inner = _deep_value(depth, True).SerializeToString()
    if field.message_type.full_name == "google.protobuf.ListValue":
        inner = _nested((1,), inner)  # ListValue.values
    elif field.message_type.full_name == "google.protobuf.Struct":
        inner = _nested((1,), _nested((1,), b"k") + _nested((2,), inner))  # Struct.fields, one entry
    return _nested(path, inner)


def _deep_groups(depth: int) -> bytes:
    """Returns an unknown field 1000 made of ``depth`` groups nested in each other."""
    return _tag(1000, 3) * depth + _tag(1000, 4) * depth


def _unknown_field() -> Strategy[bytes]:
    """Returns one field with a number the message may not declare, of any wire type (6 and 7 are invalid)."""
    numbers = st.one_of(st.sampled_from((1, 2, 3, 16, 99, 1000, 2**29 - 1)), st.integers(1, 2**29 - 1))
    bodies = {
        0: st.sampled_from(UINT64_EDGES).map(_varint),
        1: st.binary(min_size=8, max_size=8),
        2: st.binary(max_size=64).map(lambda data: _varint(len(data)) + data),
        3: st.just(b""),
        4: st.just(b""),
        5: st.binary(min_size=4, max_size=4),
        6: st.just(b""),
        7: st.just(b""),
    }
    return st.sampled_from(sorted(bodies)).flatmap(
        lambda wire_type: st.builds(lambda number, body: _tag(number, wire_type) + body, numbers, bodies[wire_type])
    )
