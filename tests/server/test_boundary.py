"""The boundary: every request field has a bound, every bound is stated in protos/, and the servers
answer each class of hostile request with INVALID_ARGUMENT and the fields at fault, and keep serving."""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

from tests.helpers import Stack, free_port, start_tier
from tierstack.client import InvalidArgumentError, NotFoundError, OrchestratorClient, UnavailableError
from tierstack.core.values import to_struct
from tierstack.server import Settings, boundary
from tierstack.server.boundary import RULES, Declared, Entries, Items, Json, Span, Wire
from tierstack.server.execute import tool
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import (
    common_pb2,
    coordinator_service_pb2,
    executor_service_pb2,
    monitor_service_pb2,
    orchestrator_service_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = (coordinator_service_pb2, orchestrator_service_pb2, executor_service_pb2, monitor_service_pb2)
_WELL_KNOWN_JSON = ("google.protobuf.Struct", "google.protobuf.Value")


def _request_types() -> Iterator[Descriptor]:
    """Yields every tierstack message that appears in a request, each once."""
    seen: set[str] = set()
    stack = [
        method.input_type
        for module in SERVICES
        for s in module.DESCRIPTOR.services_by_name.values()
        for method in s.methods
    ]
    while stack:
        message = stack.pop()
        if message.full_name in seen or not message.full_name.startswith("tierstack."):
            continue
        seen.add(message.full_name)
        yield message
        stack.extend(f.message_type for f in message.fields if f.message_type is not None)


def _bounded(field: FieldDescriptor) -> bool:
    """Says whether a field needs a rule: all but flags, empty messages and single tierstack messages
    (whose own fields carry the rules; they may have a size bound of their own)."""
    message = field.message_type
    if field.type == FieldDescriptor.TYPE_BOOL or (message and message.full_name == "google.protobuf.Empty"):
        return False
    return message is None or field.is_repeated or not message.full_name.startswith("tierstack.")


def test_every_request_field_has_a_bound_of_its_kind() -> None:
    missing = []
    for message in _request_types():
        if message.GetOptions().map_entry:
            continue
        rules = RULES.get(message.full_name, {})
        for field in message.fields:
            rule = rules.get(field.name)
            if not _bounded(field):
                assert rule is None or isinstance(rule, Wire), f"{message.full_name}.{field.name} takes no rule"
                continue
            if rule is None:
                missing.append(f"{message.full_name}.{field.name}")
                continue
            each = rule.each if isinstance(rule, Items) else rule
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                assert isinstance(rule, Entries), field.full_name
            elif field.is_repeated:
                assert isinstance(rule, Items), field.full_name
            if field.enum_type is not None:
                assert isinstance(each, Declared) and each.enum is field.enum_type, field.full_name
            if field.message_type is not None and field.message_type.full_name in _WELL_KNOWN_JSON:
                assert isinstance(rule, Json), field.full_name
            if field.message_type is not None and field.message_type.full_name == "google.protobuf.Duration":
                assert isinstance(rule, Span), field.full_name
    assert not missing, f"request fields without a bound in tierstack.server.boundary.RULES: {missing}"
    assert set(RULES) <= {m.full_name for m in _request_types()}, "rules for messages no request carries"


def _field_comments(tmp_path: Path) -> dict[str, str]:
    """Returns each field's leading comment by full name, read from protos/ by protoc."""
    out = tmp_path / "contract.binpb"
    sources = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"--proto_path={ROOT / 'protos'}", f"--proto_path={well_known}", "--include_source_info"]
    assert protoc.main([*args, f"--descriptor_set_out={out}", *sources]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    comments = {}
    for file in files.file:
        for location in file.source_code_info.location:
            path = list(location.path)
            if len(path) == 4 and path[0] == 4 and path[2] == 2:  # message_type[i].field[j]
                message = file.message_type[path[1]]
                comments[f"{file.package}.{message.name}.{message.field[path[3]].name}"] = location.leading_comments
    return comments


def test_every_bound_is_stated_in_its_fields_comment(tmp_path: Path) -> None:
    comments = _field_comments(tmp_path)
    wrong = [
        f"{message}.{field}: expected 'Bounds: {rule.describe()}.'"
        for message, rules in RULES.items()
        for field, rule in rules.items()
        if f"Bounds: {rule.describe()}." not in comments.get(f"{message}.{field}", "")
    ]
    assert not wrong, "\n".join(wrong)


def _nested(depth: int) -> struct_pb2.Struct:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    assert isinstance(value, dict)
    return to_struct(value)


def _fields(error: pytest.ExceptionInfo[InvalidArgumentError]) -> set[str]:
    return {violation.field for violation in error.value.violations}


async def _serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _one_step(**step: object) -> orchestrator_service_pb2.Workflow:
    return orchestrator_service_pb2.Workflow(
        name="w",
        steps=[orchestrator_service_pb2.WorkflowStep(id="a", tool="core.echo", **step)],  # type: ignore[arg-type]
    )


async def test_a_run_with_out_of_bound_limits_is_refused_and_nothing_is_stored(stack: Stack) -> None:
    request = orchestrator_service_pb2.StartRunRequest(
        request_id="r1",
        workflow=_one_step(),
        limits=common_pb2.ResourceLimits(max_parallelism=-1, max_depth=-1, max_credits=math.nan),
    )
    request.limits.max_duration.seconds = -5
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.start_run(request)
    assert _fields(caught) == {
        "limits.max_parallelism",
        "limits.max_depth",
        "limits.max_credits",
        "limits.max_duration",
    }
    assert caught.value.reason == "OUT_OF_BOUNDS"
    assert not (await stack.orchestrator.list_runs()).runs
    await _serving(stack.orchestrate.target)


async def test_retry_policies_are_bounded(stack: Stack) -> None:
    retry = orchestrator_service_pb2.RetryPolicy(max_attempts=2147483647, backoff_multiplier=math.nan)
    retry.initial_backoff.nanos = -1
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.validate_workflow(_one_step(retry=retry))
    assert _fields(caught) == {
        "workflow.steps[0].retry.max_attempts",
        "workflow.steps[0].retry.backoff_multiplier",
        "workflow.steps[0].retry.initial_backoff",
    }


async def test_unknown_enum_values_are_refused_everywhere(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.list_runs(orchestrator_service_pb2.ListRunsRequest(state=77))  # type: ignore[arg-type]
    assert _fields(caught) == {"state"}
    execute = executor_service_pb2.ExecuteRequest(
        execution_id="e",
        strategy=99,  # type: ignore[arg-type]
        tool_calls=[common_pb2.ToolCall(tool="core.echo")],
    )
    with pytest.raises(InvalidArgumentError) as caught:
        async for _ in stack.executor.execute(execute):
            pass
    assert _fields(caught) == {"strategy"}
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.validate_workflow(_one_step(strategy=42))
    assert _fields(caught) == {"workflow.steps[0].strategy"}
    await _serving(stack.execute.target)


async def test_run_durability_verbosity_team_parallelism_and_watch_kinds_are_bounded(stack: Stack) -> None:
    """Durability and verbosity of a run, the parallelism of a team, the kinds a run's watcher asks for."""
    start = orchestrator_service_pb2.StartRunRequest(
        workflow=_one_step(),
        durability=7,  # type: ignore[arg-type]
        verbosity=9,  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.start_run(start)
    assert _fields(caught) == {"durability", "verbosity"}
    assert not (await stack.orchestrator.list_runs(orchestrator_service_pb2.ListRunsRequest())).runs  # none stored
    team = coordinator_service_pb2.FormTeamRequest(max_parallelism=10_001)
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.coordinator.form_team(team)
    assert _fields(caught) == {"max_parallelism"}
    run = (await stack.orchestrator.start_run(orchestrator_service_pb2.StartRunRequest(workflow=_one_step()))).run
    for kinds, field in ((["step_completed"] * 33, "kinds"), (["x" * 129], "kinds[0]")):
        with pytest.raises(InvalidArgumentError) as caught:
            _ = [e async for e in stack.orchestrator.watch_run(run.run_id, kinds=kinds)]
        assert _fields(caught) == {field}
    await _serving(stack.orchestrate.target)
    await _serving(stack.coordinate.target)


async def test_agents_with_absurd_capacities_are_refused(stack: Stack) -> None:
    agents = [
        coordinator_service_pb2.Agent(id="a", capabilities=["x"], max_concurrent_tasks=2147483647),
        coordinator_service_pb2.Agent(id="b", capabilities=["x"], current_load=-2147483647),
    ]
    subtasks = [coordinator_service_pb2.Subtask(id="s", required_capabilities=["x"])]
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.coordinator.form_team(coordinator_service_pb2.FormTeamRequest(agents=agents, subtasks=subtasks))
    assert _fields(caught) == {"agents[0].max_concurrent_tasks", "agents[1].current_load"}
    await _serving(stack.coordinate.target)


async def test_a_negative_batch_concurrency_is_refused(stack: Stack) -> None:
    request = executor_service_pb2.ExecuteToolsRequest(
        calls=[common_pb2.ToolCall(tool="core.echo")], max_concurrency=-1
    )
    with pytest.raises(InvalidArgumentError) as caught:
        async for _ in stack.executor.execute_tools(request):
            pass
    assert _fields(caught) == {"max_concurrency"}


async def test_json_nested_too_deep_is_refused_by_field(stack: Stack) -> None:
    call = common_pb2.ToolCall(tool="core.echo", arguments=_nested(boundary.MAX_JSON_DEPTH + 1))
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=call))
    assert _fields(caught) == {"call.arguments"}
    fits = common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": 1}))
    assert (await stack.executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=fits))).result.output


def _field(number: int, payload: bytes) -> bytes:
    """Returns a length-delimited field in wire form."""
    size, length = bytearray(), len(payload)
    while True:
        size.append(length & 0x7F | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(size) + payload


async def _raw(target: str, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(payload, timeout=10)
    return caught.value


async def test_bytes_that_are_no_message_get_invalid_argument(stack: Stack) -> None:
    # GetRunRequest.run_id (field 1, length-delimited) holding invalid UTF-8.
    invalid_utf8 = b"\x0a\x02\xff\xfe"
    error = await _raw(stack.orchestrate.target, "/tierstack.v1.OrchestratorService/GetRun", invalid_utf8)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A value nested past every parser's limit (lists in lists), as bytes.
    value = b"\x11" + bytes(8)  # Value.number_value = 0
    for _ in range(120):
        value = _field(6, _field(1, value))  # Value.list_value.values[0]
    entry = _field(1, b"value") + _field(2, value)
    call = _field(1, b"core.echo") + _field(2, _field(1, entry))
    error = await _raw(stack.execute.target, "/tierstack.v1.ExecutorService/ExecuteTool", _field(2, call))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _serving(stack.execute.target)
    await _serving(stack.orchestrate.target)


async def test_errors_quote_no_more_than_a_short_prefix(stack: Stack) -> None:
    huge = "x" * 3_000_000
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.orchestrator.get_run(huge)
    assert len(str(caught.value)) < 300
    with pytest.raises(NotFoundError) as missing:
        await stack.orchestrator.get_run("r" * 128)
    assert "r" * 64 not in missing.value.message


async def test_errors_show_no_internal_address_nor_exception_class(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, execute_target=f"127.0.0.1:{free_port()}")  # nobody listens there
    orchestrate = await start_tier("orchestrate", settings)
    try:
        async with OrchestratorClient(orchestrate.target) as client:
            with pytest.raises(UnavailableError) as caught:
                await client.start_run(orchestrator_service_pb2.StartRunRequest(workflow=_one_step()))
    finally:
        await orchestrate.stop()
    assert "127.0.0.1" not in str(caught.value) and "ipv4" not in str(caught.value)


async def test_a_tool_failing_unexpectedly_is_reported_without_its_exception(stack: Stack) -> None:
    @tool("test.broken")
    async def broken() -> str:
        raise KeyError("/srv/secret/path")

    service = stack.execute.service
    assert isinstance(service, ExecuteService)
    service.registry.register(broken)
    call = common_pb2.ToolCall(tool="test.broken")
    result = (await stack.executor.execute_tool(executor_service_pb2.ExecuteToolRequest(call=call))).result
    assert result.error.reason == "TOOL_FAILED"
    assert "KeyError" not in result.error.message and "/srv" not in result.error.message
