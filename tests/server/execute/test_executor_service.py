"""ExecutorService through the SDK: built-in tools, step events, errors and the tool listing."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.helpers import HttpServer, Stack, reply, start_tier
from tests.server.spender import Spender
from tierstack.client import ExecutorClient, InvalidArgumentError, ResourceExhaustedError
from tierstack.core.values import from_value, to_struct
from tierstack.server import Settings
from tierstack.server.execute import Tool, ToolContext, ToolError
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2


def tool_request(tool: str, **arguments: object) -> executor_service_pb2.ExecuteToolRequest:
    return executor_service_pb2.ExecuteToolRequest(call=common_pb2.ToolCall(tool=tool, arguments=to_struct(arguments)))


async def test_json_query_reshapes_data(stack: Stack) -> None:
    data = {"people": [{"name": "Ada", "age": 36}, {"name": "Alan", "age": 41}]}
    response = await stack.executor.execute_tool(
        tool_request("json.query", data=data, expression="{names: people[].name, oldest: max_by(people, &age).name}")
    )
    assert from_value(response.result.output) == {"names": ["Ada", "Alan"], "oldest": "Alan"}


async def test_text_template_renders_in_a_sandbox(stack: Stack) -> None:
    ok = await stack.executor.execute_tool(
        tool_request("text.template", template="{{ n }} items for {{ who|upper }}", variables={"n": 3, "who": "ada"})
    )
    assert from_value(ok.result.output) == "3 items for ADA"
    unsafe = await stack.executor.execute_tool(
        tool_request("text.template", template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    )
    assert unsafe.result.error.reason == "TEMPLATE_UNSAFE"


async def test_bad_arguments_name_the_field(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.executor.execute_tool(tool_request("json.query", data=[1], expression=7))
    error = caught.value
    assert error.reason == "INVALID_TOOL_ARGUMENTS"
    assert error.domain == "tierstack.dev"
    assert [v.field for v in error.violations] == ["call.arguments.expression"]


async def test_unknown_tool_is_invalid_argument(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.executor.execute_tool(tool_request("no.such.tool"))
    assert caught.value.reason == "UNKNOWN_TOOL"
    assert caught.value.violations[0].field == "call.tool"
    # The server keeps serving after rejecting a request.
    response = await stack.executor.execute_tool(tool_request("core.echo", value=1))
    assert from_value(response.result.output) == 1


async def test_http_request_reads_an_allowed_host(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/data"] = reply(json.dumps({"temperature": 21}).encode())
    response = await stack.executor.execute_tool(tool_request("http.request", url=f"{http_server.url}/data"))
    output = from_value(response.result.output)
    assert isinstance(output, dict)
    assert output["status"] == 200
    assert output["json"] == {"temperature": 21}


async def test_http_request_refuses_hosts_off_the_allow_list(data_dir: Path, http_server: HttpServer) -> None:
    server = await start_tier("execute", Settings(data_dir=data_dir, http_allowed_hosts=("*.example.com",)))
    try:
        async with ExecutorClient(server.target) as client:
            response = await client.execute_tool(tool_request("http.request", url=f"{http_server.url}/"))
    finally:
        await server.stop()
    assert response.result.error.reason == "HOST_NOT_ALLOWED"
    assert not http_server.hits


async def test_http_request_reaches_no_local_address_unless_allowed(data_dir: Path, http_server: HttpServer) -> None:
    """By default the tool refuses every address a host resolves to that is not public, whatever its
    name; an operator allows networks, but never the tiers' own ports."""
    http_server.routes["/host"] = lambda request: reply(request.headers["Host"].encode(), "text/plain")(request)
    port = http_server.url.rpartition(":")[2]
    refused = [
        http_server.url,
        f"http://localhost:{port}/host",  # a name allowed, its address not
        f"http://2130706433:{port}/host",  # 127.0.0.1 written as a number
        f"http://[::ffff:127.0.0.1]:{port}/host",
        f"http://[::ffff:0:7f00:1]:{port}/host",  # 127.0.0.1 as an IPv4-translated address
        f"http://0.0.0.0:{port}/host",
    ]
    default = await start_tier("execute", Settings(data_dir=data_dir), loopback_tools=False)
    allowed = await start_tier("execute", Settings(data_dir=data_dir, metrics_port=0))
    try:
        async with ExecutorClient(default.target) as first, ExecutorClient(allowed.target) as second:
            for url in refused:
                response = await first.execute_tool(tool_request("http.request", url=url))
                assert response.result.error.reason == "ADDRESS_NOT_ALLOWED", url
                if "localhost" in url:  # the error names the host as the caller wrote it, not what it resolved to
                    assert "127.0.0.1" not in response.result.error.message
            assert not http_server.hits
            # Allowed: the call goes to the address that was checked, under the name it was given, whatever
            # Host header the caller sets (another host on that address would be off the allow-list).
            response = await second.execute_tool(
                tool_request("http.request", url=f"http://localhost:{port}/host", headers={"Host": "admin.internal"})
            )
            assert from_value(response.result.output)["body"] == f"localhost:{port}"  # type: ignore[index,call-overload]
            # The ports it was given as 0 are refused once bound, as are the tiers' defaults.
            own_ports = (f"{allowed.metrics_port}/metrics", f"{allowed.port}/", "50053/")
            for own in (f"http://127.0.0.1:{own}" for own in own_ports):
                response = await second.execute_tool(tool_request("http.request", url=own))
                assert response.result.error.reason == "ADDRESS_NOT_ALLOWED", own
    finally:
        await default.stop()
        await allowed.stop()
    assert http_server.hits == ["/host"]


async def test_http_request_keeps_no_cookie_from_one_call_for_the_next(stack: Stack, http_server: HttpServer) -> None:
    """The tool serves every tenant, so a session cookie one call was given never goes with another."""

    def login(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Set-Cookie", "session=acme-secret; Path=/")
        request.send_header("Content-Length", "0")
        request.end_headers()

    http_server.routes["/login"] = login
    http_server.routes["/whoami"] = lambda request: reply((request.headers["Cookie"] or "none").encode(), "text/plain")(
        request
    )
    await stack.executor.execute_tool(tool_request("http.request", url=f"{http_server.url}/login"))
    response = await stack.executor.execute_tool(tool_request("http.request", url=f"{http_server.url}/whoami"))
    assert from_value(response.result.output)["body"] == "none"  # type: ignore[index,call-overload]


async def test_a_host_that_keeps_failing_is_given_a_rest(stack: Stack, http_server: HttpServer) -> None:
    """After 5 failures (5xx answers) within a minute, calls to the host stop for a while: the sixth
    is refused without reaching it, and another host is still called."""
    http_server.routes["/down"] = reply(b"busy", "text/plain", status=503)
    http_server.routes["/up"] = reply(b"fine", "text/plain")
    for _ in range(5):
        response = await stack.executor.execute_tool(tool_request("http.request", url=f"{http_server.url}/down"))
        assert from_value(response.result.output)["status"] == 503  # type: ignore[index,call-overload]
    response = await stack.executor.execute_tool(tool_request("http.request", url=f"{http_server.url}/up"))
    assert response.result.error.reason == "CIRCUIT_OPEN"  # the host, not the path, is resting
    assert http_server.hits == ["/down"] * 5
    other = http_server.url.replace("127.0.0.1", "localhost")  # another host name, its own breaker
    response = await stack.executor.execute_tool(tool_request("http.request", url=f"{other}/up"))
    assert from_value(response.result.output)["body"] == "fine"  # type: ignore[index,call-overload]


async def test_http_request_caps_the_response_size(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/big"] = reply(b"x" * 5000, "text/plain")
    response = await stack.executor.execute_tool(
        tool_request("http.request", url=f"{http_server.url}/big", max_bytes=1000)
    )
    assert response.result.error.reason == "RESPONSE_TOO_LARGE"


async def test_http_request_times_out(stack: Stack, http_server: HttpServer) -> None:
    release = threading.Event()

    def hang(request: BaseHTTPRequestHandler) -> None:
        release.wait(10)

    http_server.routes["/hang"] = hang
    try:
        response = await stack.executor.execute_tool(
            tool_request("http.request", url=f"{http_server.url}/hang", timeout_seconds=0.2)
        )
    finally:
        release.set()
    assert response.result.error.reason == "HTTP_TIMEOUT"


async def test_execute_streams_the_step_events_in_order(stack: Stack) -> None:
    request = executor_service_pb2.ExecuteRequest(
        progress=True,
        execution_id="run-1/a/1",
        step_id="a",
        tool_calls=[
            common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": [1, 2]})),
            common_pb2.ToolCall(tool="json.query", arguments=to_struct({"data": [1, 2], "expression": "sum(@)"})),
        ],
    )
    events = [event async for event in stack.executor.execute(request)]
    assert [e.WhichOneof("payload") for e in events] == [
        "started",
        "strategy_selected",
        "tool_call_started",
        "tool_call_finished",
        "tool_call_started",
        "tool_call_finished",
        "output",
        "completed",
    ]
    assert [e.sequence for e in events] == list(range(1, 9))
    assert {e.execution_id for e in events} == {"run-1/a/1"}
    # Asked again without progress, the same execution (replayed) sends only its output and end.
    request.progress = False
    again = [event async for event in stack.executor.execute(request)]
    assert [(e.WhichOneof("payload"), e.sequence) for e in again] == [("output", 7), ("completed", 8)]
    assert len({e.correlation_id for e in events}) == 1 and events[0].correlation_id
    assert from_value(events[-2].output.value) == 3
    assert events[-1].completed.usage.tool_calls == 2


async def test_execute_stops_at_the_first_failing_call(stack: Stack) -> None:
    request = executor_service_pb2.ExecuteRequest(
        progress=True,
        step_id="a",
        tool_calls=[
            common_pb2.ToolCall(tool="json.query", arguments=to_struct({"data": 1, "expression": "a[?"})),
            common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": 1})),
        ],
    )
    events = [event async for event in stack.executor.execute(request)]
    assert events[-1].WhichOneof("payload") == "failed"
    assert events[-1].failed.error.reason == "INVALID_EXPRESSION"
    assert events[-1].failed.usage.tool_calls == 1


async def test_execute_rejects_a_bad_call_before_running_any(stack: Stack) -> None:
    request = executor_service_pb2.ExecuteRequest(
        progress=True,
        step_id="a",
        tool_calls=[
            common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": 1})),
            common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"unexpected": 1})),
        ],
    )
    with pytest.raises(InvalidArgumentError) as caught:
        _ = [event async for event in stack.executor.execute(request)]
    assert caught.value.violations[0].field == "tool_calls[1].arguments"


async def test_list_tools_pages_through_every_tool(stack: Stack) -> None:
    names: list[str] = []
    token = ""
    while True:
        page = await stack.executor.list_tools(executor_service_pb2.ListToolsRequest(page_size=2, page_token=token))
        names.extend(tool.name for tool in page.tools)
        assert all(tool.source == executor_service_pb2.TOOL_SOURCE_BUILTIN for tool in page.tools)
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(names)
    assert {"core.echo", "http.request", "json.query", "text.template"} <= set(names)


async def test_list_tools_rejects_a_negative_page_size(stack: Stack) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await stack.executor.list_tools(executor_service_pb2.ListToolsRequest(page_size=-1))
    assert caught.value.violations[0].field == "page_size"


async def test_sleep_waits_and_honours_the_call_timeout(stack: Stack) -> None:
    done = await stack.executor.execute_tool(tool_request("core.sleep", seconds=0.01))
    assert from_value(done.result.output) == 0.01
    request = tool_request("core.sleep", seconds=30)
    request.timeout.FromMilliseconds(50)
    cut = await stack.executor.execute_tool(request)
    assert cut.result.error.reason == "TOOL_TIMEOUT"


async def test_a_step_over_its_budget_is_refused_before_it_runs(stack: Stack) -> None:
    service = stack.execute.service
    assert isinstance(service, ExecuteService)
    service.registry.register(
        Tool(name="test.paid", description="costs 0.4", parameters={"type": "object"}, handler=_free, credits=0.4)
    )
    paid = common_pb2.ToolCall(tool="test.paid", arguments=to_struct({}))
    request = executor_service_pb2.ExecuteRequest(
        progress=True,
        step_id="a",
        tool_calls=[paid, paid, paid],
        limits=common_pb2.ResourceLimits(max_tool_calls=2, max_credits=1.0),
    )
    with pytest.raises(ResourceExhaustedError) as caught:
        _ = [event async for event in stack.executor.execute(request)]
    assert caught.value.reason == "STEP_BUDGET_EXCEEDED"
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("max_tool_calls", "the step makes 3 tool calls; it may make 2"),
        ("max_credits", "the step's calls cost 1.2 credits; it may spend 1"),
    ]
    within = executor_service_pb2.ExecuteRequest(
        progress=True,
        step_id="a",
        tool_calls=[paid, paid],
        limits=common_pb2.ResourceLimits(max_tool_calls=2, max_credits=1.0),
    )
    events = [event async for event in stack.executor.execute(within)]
    usage = events[-1].completed.usage
    assert usage.tool_calls == 2
    assert usage.credits == pytest.approx(0.8)


async def _free(arguments: dict[str, object], context: ToolContext) -> None:
    return None


async def _broken(arguments: dict[str, object], context: ToolContext) -> None:
    raise ToolError("BROKEN", "always")


async def test_a_critical_tool_is_tried_again_only_within_the_steps_tool_calls(stack: Stack) -> None:
    service = stack.execute.service
    assert isinstance(service, ExecuteService)
    service.registry.register(
        Tool(name="test.broken", description="fails", parameters={"type": "object"}, handler=_broken, critical=True)
    )
    call = common_pb2.ToolCall(tool="test.broken", arguments=to_struct({}))
    request = executor_service_pb2.ExecuteRequest(
        progress=True, step_id="a", tool_calls=[call], limits=common_pb2.ResourceLimits(max_tool_calls=2)
    )
    events = [event async for event in stack.executor.execute(request)]
    assert events[-1].failed.error.reason == "BROKEN"
    assert events[-1].failed.usage.tool_calls == 2


async def test_a_model_driven_step_stays_within_its_credits_and_tokens(stack: Stack) -> None:
    service = stack.execute.service
    assert isinstance(service, ExecuteService)
    service.registry.register(
        Tool(name="test.paid", description="costs 0.4", parameters={"type": "object"}, handler=_free, credits=0.4)
    )
    spender = Spender(stack.execute)

    def asking(tool: str, limits: common_pb2.ResourceLimits) -> executor_service_pb2.ExecuteRequest:
        return executor_service_pb2.ExecuteRequest(
            progress=True,
            step_id="a",
            strategy=common_pb2.STRATEGY_CONVERSATIONAL,
            prompt=f"use {tool}",
            tools=[tool],
            limits=limits,
        )

    # The local model calls the tool the prompt names; a call the step cannot pay for is not made.
    unpaid = [e async for e in stack.executor.execute(asking("test.paid", common_pb2.ResourceLimits(max_credits=0.3)))]
    assert events_of(unpaid, "tool_call_started") == []
    assert unpaid[-1].failed.error.reason == "CREDIT_BUDGET_EXHAUSTED"
    assert unpaid[-1].failed.usage.credits == 0
    # The tools the model calls may use what its own answers left of the step's tokens, no more.
    spent = [e async for e in stack.executor.execute(asking("test.spend", common_pb2.ResourceLimits(max_tokens=200)))]
    [replied] = events_of(spent, "model_replied")
    assert spender.allowed == [200 - replied.model_replied.tokens]
    assert spent[-1].failed.error.reason == "TOKEN_BUDGET_EXHAUSTED"
    assert spent[-1].failed.usage.tokens == 200


def events_of(
    events: list[executor_service_pb2.ExecutionEvent], kind: str
) -> list[executor_service_pb2.ExecutionEvent]:
    return [event for event in events if event.WhichOneof("payload") == kind]
