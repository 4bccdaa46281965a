"""Tools in worker processes, through real servers: a deadline stops a call that spins, memory and
output are capped, the sandbox is immutable, and the server serves other calls all the while."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pebble.pool.process import WORKERS_NAME

from tests.helpers import Stack, wait_for
from tests.server.orchestrate.workflows import step, workflow
from tierstack.core.values import from_value, to_struct
from tierstack.server.execute import Tool, tool
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb

#: Ten billion loop turns: longer than any test may run.
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@tool("test.spin", timeout_seconds=1.0)
def spin() -> int:
    """Never returns."""
    while True:
        pass


@tool("test.where")
def where() -> int:
    """Returns the id of the process it runs in."""
    return os.getpid()


@tool("test.die")
def die() -> int:
    """Kills its own worker process, once the server has seen the call start."""
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def _unreachable() -> int:
    return 1


# The name is gone once the module is imported, so a worker cannot find the function by it.
unreachable = tool("test.unreachable")(_unreachable)
del _unreachable


def request(
    tool_name: str, timeout: float | None = None, **arguments: object
) -> executor_service_pb2.ExecuteToolRequest:
    call = common_pb2.ToolCall(tool=tool_name, arguments=to_struct(arguments))
    limit = duration_pb2.Duration(seconds=int(timeout)) if timeout else None
    return executor_service_pb2.ExecuteToolRequest(call=call, timeout=limit)


def workers() -> list[int]:
    """Returns the ids of this process's tool workers."""
    return [p.pid for p in multiprocessing.active_children() if p.name == WORKERS_NAME and p.pid is not None]


def running(pid: int) -> bool:
    """Says whether process ``pid`` is on a CPU or waiting for one (``R`` in /proc), not asleep."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "R"


async def idle_workers() -> None:
    """Waits until the workers have started and none is busy (a worker starting up is busy importing,
    and would pass for the one on a call)."""
    await wait_for(lambda: bool(workers()) and not any(running(pid) for pid in workers()), attempts=3000)


async def spinning_worker() -> int:
    """Waits until a worker is busy on a call and returns its id (call :func:`idle_workers` first)."""
    await wait_for(lambda: any(running(pid) for pid in workers()))
    return next(pid for pid in workers() if running(pid))


@pytest.fixture
async def health(stack: Stack) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    async with grpc.aio.insecure_channel(stack.execute.target) as channel:
        yield health_pb2_grpc.HealthStub(channel)


def register(stack: Stack, *tools: Tool) -> None:
    service = stack.execute.service
    assert isinstance(service, ExecuteService)
    for found in tools:
        service.registry.register(found)


async def serves(stack: Stack, health: health_pb2_grpc.HealthStub) -> bool:
    """Says whether Execute answers a health check SERVING and a core.echo call."""
    checked = await health.Check(health_pb2.HealthCheckRequest(service="tierstack.v1.ExecutorService"))
    echoed = await stack.executor.execute_tool(request("core.echo", value="still here"))
    return checked.status == health_pb2.HealthCheckResponse.SERVING and from_value(echoed.result.output) == "still here"


async def test_a_spinning_template_is_stopped_at_its_deadline_while_other_calls_are_served(
    stack: Stack, health: health_pb2_grpc.HealthStub
) -> None:
    finished: list[str] = []

    async def call(name: str, sent: executor_service_pb2.ExecuteToolRequest) -> common_pb2.ToolResult:
        result = (await stack.executor.execute_tool(sent)).result
        finished.append(name)
        return result

    await idle_workers()
    spinning = asyncio.create_task(call("spin", request("text.template", timeout=2, template=SPIN)))
    pid = await spinning_worker()
    assert await serves(stack, health)
    echoed = await call("echo", request("core.echo", value=1))
    spun = await spinning
    assert finished == ["echo", "spin"]
    assert from_value(echoed.output) == 1
    assert spun.error.reason == "TOOL_TIMEOUT"
    await wait_for(lambda: pid not in workers(), attempts=3000)  # killed, and the pool starts another
    rendered = await stack.executor.execute_tool(request("text.template", template="{{ 6 * 7 }}"))
    assert from_value(rendered.result.output) == "42"


async def test_a_spinning_step_fails_at_its_timeout_and_the_next_run_succeeds(
    stack: Stack, health: health_pb2_grpc.HealthStub
) -> None:
    spinning = workflow(step("spin", "text.template", template=SPIN), name="spin")
    spinning.steps[0].timeout.FromSeconds(2)
    finished: list[str] = []

    async def run(wf: pb.Workflow) -> list[pb.RunEvent]:
        events = [event async for event in stack.orchestrator.orchestrate(pb.OrchestrateRequest(workflow=wf))]
        finished.append(wf.name)
        return events

    await idle_workers()
    spun = asyncio.create_task(run(spinning))
    await spinning_worker()
    assert await serves(stack, health)
    assert not spun.done()  # served while the step still spun
    failed = (await spun)[-1]
    assert finished == ["spin"]
    assert failed.WhichOneof("payload") == "run_failed"
    run_state = await stack.orchestrator.get_run(failed.run_id)
    assert [(s.state, s.error.reason) for s in run_state.steps] == [(pb.STEP_STATE_FAILED, "TOOL_TIMEOUT")]
    done = (await run(workflow(step("greet", "text.template", template="Hello {{ 'Ada' }}"), name="greet")))[-1]
    assert done.WhichOneof("payload") == "run_completed"
    assert from_value(done.run_completed.outputs["greet"]) == "Hello Ada"


async def test_outputs_and_memory_are_capped_in_the_worker(stack: Stack, health: health_pb2_grpc.HealthStub) -> None:
    # Each [@,@,@,@] refers to the list before it four times: 4**10 * 32 numbers, 377 MB as JSON.
    exploding = await stack.executor.execute_tool(
        request("json.query", data=list(range(32)), expression=" | ".join(["[@,@,@,@]"] * 10))
    )
    assert exploding.result.error.reason in ("OUTPUT_TOO_LARGE", "TOOL_MEMORY_LIMIT")
    assert await serves(stack, health)
    long_text = await stack.executor.execute_tool(
        request("text.template", template="{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}")
    )
    assert long_text.result.error.reason == "OUTPUT_TOO_LARGE"
    assert str(1 << 20) in long_text.result.error.message  # names the cap
    before = set(workers())
    hungry = await stack.executor.execute_tool(
        request("text.template", template="{{ 'x' * n }}", variables={"n": 10**9})
    )
    assert hungry.result.error.reason == "TOOL_MEMORY_LIMIT"
    await wait_for(lambda: len(set(workers()) - before) == 1)  # that worker was replaced
    assert await serves(stack, health)


async def test_templates_cannot_change_the_values_they_are_given(stack: Stack) -> None:
    for template in (
        "{% set _ = x.pop() %}{{ x }}",
        "{{ x.append(4) }}",
        "{{ d.update({'b': 2}) }}",
        "{{ d.clear() }}",
    ):
        response = await stack.executor.execute_tool(
            request("text.template", template=template, variables={"x": [1, 2, 3], "d": {"a": 1}})
        )
        assert response.result.error.reason == "TEMPLATE_UNSAFE", template
    reading = await stack.executor.execute_tool(
        request("text.template", template="{{ x|length }} {{ x|sort|first }}", variables={"x": [3, 1, 2]})
    )
    assert from_value(reading.result.output) == "3 1"


async def test_a_spinning_python_tool_is_stopped_and_its_worker_replaced(
    stack: Stack, health: health_pb2_grpc.HealthStub
) -> None:
    register(stack, spin, where)
    await idle_workers()
    spinning = asyncio.create_task(stack.executor.execute_tool(request("test.spin")))
    pid = await spinning_worker()
    assert await serves(stack, health)
    assert (await spinning).result.error.reason == "TOOL_TIMEOUT"  # its own timeout: one second
    await wait_for(lambda: pid not in workers(), attempts=3000)
    worker = from_value((await stack.executor.execute_tool(request("test.where"))).result.output)
    assert worker in workers() and worker != os.getpid()


async def test_a_worker_that_dies_fails_its_call_clearly_and_others_take_over(stack: Stack) -> None:
    register(stack, die, where)
    died = (await stack.executor.execute_tool(request("test.die"))).result.error
    assert died.reason == "WORKER_DIED"
    assert "Expired" not in died.message and "/" not in died.message
    assert from_value((await stack.executor.execute_tool(request("test.where"))).result.output) in workers()


async def test_a_function_a_worker_cannot_find_fails_clearly(stack: Stack) -> None:
    register(stack, unreachable)
    error = (await stack.executor.execute_tool(request("test.unreachable"))).result.error
    assert error.reason == "TOOL_NOT_FOUND"
    assert "module level" in error.message


async def test_the_pool_recovers_when_its_idle_workers_are_killed(
    stack: Stack, health: health_pb2_grpc.HealthStub
) -> None:
    register(stack, where)
    killed = workers()
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)  # pebble gives up on a pool whose idle workers die
    await wait_for(lambda: not set(killed) & set(workers()))
    outcomes = [(await stack.executor.execute_tool(request("test.where"))).result for _ in range(2)]
    # The call that finds the pool broken may fail, clearly; the pool is replaced for the next.
    assert {r.error.reason for r in outcomes[:1] if r.HasField("error")} <= {"WORKER_DIED"}
    assert from_value(outcomes[-1].output) in workers()
    assert await serves(stack, health)
