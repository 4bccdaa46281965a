"""The command line against the three tiers running as separate processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import (
    TIERSTACK,
    HttpServer,
    Process,
    Stack,
    free_port,
    open_stack,
    reply,
    spawn_tier,
    spawned_stack,
    start_tier,
    stop,
)
from tierstack.client import CoordinatorClient, ExecutorClient, MonitorClient
from tierstack.server import Settings
from tierstack.server.crosstier import Thresholds
from tierstack.v1 import coordinator_service_pb2 as pb
from tools.postgres import LocalPostgres


@pytest.fixture
async def tiers(tmp_path: Path) -> AsyncIterator[dict[str, Process]]:
    async with spawned_stack(tmp_path, {**os.environ, "TIERSTACK_LOG_LEVEL": "DEBUG"}) as started:
        yield started


async def run_cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *TIERSTACK,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_a_goal_runs_through_three_processes(tiers: dict[str, Process]) -> None:
    code, output = await run_cli(
        "goal",
        "analyze the logs and count the errors, then write a summary",
        "--target",
        tiers["coordinate"].target,
        "--correlation-id",
        "cli-goal-7",
    )
    assert code == 0, output
    assert "goal completed" in output
    assert "write a summary" in output
    assert "planned by the offline stand-in (rules, no model)" in output  # a newcomer learns why
    # The correlation id reaches every tier's log lines, and the servers stop cleanly.
    for name, process in tiers.items():
        assert await stop(process) == 0
        tagged = [line for line in process.lines if "[cli-goal-7]" in line]
        assert tagged, f"{name} logged nothing for the goal"
        assert any("stopped" in line for line in process.lines)


async def test_run_shows_a_workflow_to_completion(tiers: dict[str, Process], tmp_path: Path) -> None:
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(
        textwrap.dedent(
            """\
            name: greet
            inputs:
              - {name: who, type: INPUT_TYPE_STRING, default_value: Ada}
            steps:
              - id: hello
                tool: text.template
                parameters: {template: "Hi {{ n }}", variables: {n: "{{inputs.who}}"}}
              - id: shout
                tool: json.query
                depends_on: [hello]
                parameters: {data: "{{steps.hello.output}}", expression: "@"}
            """
        )
    )
    code, output = await run_cli(
        "run", str(workflow), "--input", "who=Grace", "--durability", "sync", "--target", tiers["orchestrate"].target
    )
    assert code == 0, output
    assert '"shout": "Hi Grace"' in output
    assert "offline stand-in" not in output  # no model answered


async def test_run_marks_the_answers_of_the_offline_model(tiers: dict[str, Process], tmp_path: Path) -> None:
    workflow = tmp_path / "ask.yaml"
    workflow.write_text("name: ask\nsteps:\n  - {id: ask, tool: ai.complete, parameters: {prompt: say hello}}\n")
    code, output = await run_cli("run", str(workflow), "--target", tiers["orchestrate"].target)
    assert code == 0, output
    assert "model answers from the offline stand-in (model local)" in output


async def test_a_malformed_agent_is_refused_before_anything_is_sent() -> None:
    for malformed in ("bad", "=writing", "writer=", "writer=,"):
        code, output = await run_cli("goal", "write a haiku", "--agent", malformed, "--target", "127.0.0.1:1")
        assert code == 2, malformed
        assert "is not NAME=CAPABILITY" in output, output
        assert "UNAVAILABLE" not in output  # refused before any call


async def test_run_reports_a_malformed_workflow_by_field(tiers: dict[str, Process], tmp_path: Path) -> None:
    workflow = tmp_path / "bad.yaml"
    workflow.write_text(
        "name: bad\nsteps:\n"
        "  - {id: a, tool: core.echo, depends_on: [b]}\n"
        "  - {id: b, tool: core.echo, depends_on: [a]}\n"
    )
    code, output = await run_cli("run", str(workflow), "--target", tiers["orchestrate"].target)
    assert code == 2
    assert "INVALID_ARGUMENT" in output
    assert "workflow.steps: dependency cycle: a -> b -> a" in output


async def test_up_runs_the_stack_until_interrupted(tmp_path: Path) -> None:
    ports = {tier: free_port() for tier in ("execute", "orchestrate", "coordinate")}
    env = {**os.environ, **{f"TIERSTACK_{tier.upper()}_PORT": str(port) for tier, port in ports.items()}}
    env.update({f"TIERSTACK_{tier.upper()}_METRICS_PORT": "0" for tier in ports})
    up = await asyncio.create_subprocess_exec(
        *TIERSTACK, "up", "--data-dir", str(tmp_path), env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        target = f"127.0.0.1:{ports['coordinate']}"
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest()
            await health.Check(check, wait_for_ready=True, timeout=60)
        async with CoordinatorClient(target) as client:
            request = pb.CoordinateRequest(goal="write a haiku", agents=[pb.Agent(id="w", capabilities=["writing"])])
            events = [event async for event in client.coordinate(request)]
        assert events[-1].HasField("goal_completed")
    finally:
        up.send_signal(signal.SIGINT)
        code = await up.wait()
    assert code == 0


async def test_up_runs_replicas_of_every_tier_on_postgresql(tmp_path: Path, postgres_server: LocalPostgres) -> None:
    ports = {tier: free_port() for tier in ("execute", "orchestrate", "coordinate")}
    env = {**os.environ, **{f"TIERSTACK_{tier.upper()}_PORT": str(port) for tier, port in ports.items()}}
    env.update({f"TIERSTACK_{tier.upper()}_METRICS_PORT": "0" for tier in ports})
    store = postgres_server.new_database()
    arguments = ("up", "--data-dir", str(tmp_path), "--store", store, "--replicas", "2")
    up = await asyncio.create_subprocess_exec(*TIERSTACK, *arguments, env=env, stderr=asyncio.subprocess.DEVNULL)
    try:
        replicas = [f"127.0.0.1:{ports['coordinate'] + 100 * k}" for k in range(2)]
        for target in replicas:
            async with grpc.aio.insecure_channel(target) as channel:
                check = health_pb2.HealthCheckRequest()
                await health_pb2_grpc.HealthStub(channel).Check(check, wait_for_ready=True, timeout=60)
        async with CoordinatorClient(",".join(replicas)) as client:  # balanced over both
            request = pb.CoordinateRequest(goal="write a haiku", agents=[pb.Agent(id="w", capabilities=["writing"])])
            for _ in range(2):
                events = [event async for event in client.coordinate(request)]
                assert events[-1].HasField("goal_completed")
            assert len((await client.list_goals()).goals) == 2  # one store behind both
    finally:
        up.send_signal(signal.SIGINT)
        code = await up.wait()
    assert code == 0


@pytest.mark.parametrize("taken", ["port", "metrics port"])
async def test_a_server_on_a_taken_port_exits_naming_it(taken: str) -> None:
    first = await spawn_tier("execute", env=dict(os.environ))
    try:
        metrics = next(m.group(1) for line in first.lines if (m := re.search(r"metrics at http://(\S+)/", line)))
        if taken == "port":
            args, expected = ["--port", first.target.rpartition(":")[2]], f"cannot listen on {first.target}"
        else:
            args, expected = ["--port", "0", "--metrics-port", metrics.rpartition(":")[2]], f"on {metrics}"
        second = await asyncio.create_subprocess_exec(
            *TIERSTACK,
            "serve",
            "execute",
            *args,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TIERSTACK_EXECUTE_METRICS_PORT": "off"},
        )
        _, errors = await second.communicate()
        assert second.returncode == 1
        lines = errors.decode().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("error: execute ")
        assert not any("Traceback" in line for line in lines)
        assert not any("serving on" in line for line in lines)
        async with ExecutorClient(first.target) as client:  # the first one serves on
            assert (await client.list_tools()).tools
    finally:
        assert await stop(first) == 0


async def test_up_says_which_tier_cannot_take_its_port(tmp_path: Path) -> None:
    # Another server holds Orchestrate's port and answers health checks there, as a second stack's would.
    holder = await start_tier("execute", Settings(data_dir=tmp_path / "holder"))
    ports = {"execute": free_port(), "orchestrate": holder.port, "coordinate": free_port()}
    env = {**os.environ, **{f"TIERSTACK_{tier.upper()}_PORT": str(port) for tier, port in ports.items()}}
    env.update({f"TIERSTACK_{tier.upper()}_METRICS_PORT": "off" for tier in ports})
    up = await asyncio.create_subprocess_exec(
        *TIERSTACK,
        "up",
        "--data-dir",
        str(tmp_path / "data"),
        env=env,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # one process group: the test can end up and its children together
    )
    try:
        _, errors = await up.communicate()
    finally:
        if up.returncode is None:
            os.killpg(up.pid, signal.SIGKILL)
            await up.wait()
        await holder.stop()
    output = errors.decode()
    assert up.returncode == 1, output
    assert re.search(rf"orchestrate failed to start: .*cannot listen on 127\.0\.0\.1:{ports['orchestrate']}\b", output)
    assert "tierstack is up" not in output and "Traceback" not in output
    assert "TIER_EXECUTE serving on" in output  # its children's lines are passed on
    assert "TIER_EXECUTE stopped" in output  # the tier that had started was stopped
    assert "TIER_COORDINATE" not in output  # and the one above never started


EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


async def test_the_readme_examples_run(tiers: dict[str, Process]) -> None:
    code, output = await run_cli(
        "run",
        str(EXAMPLES / "weather-report.yaml"),
        "--input",
        "city=Porto",
        "--target",
        tiers["orchestrate"].target,
    )
    assert code == 0, output
    assert "Weather report for Porto: 18 to 24 °C, averaging 20.8 °C." in output
    assert '"warning": null' in output
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "sdk_quickstart.py"),
        tiers["coordinate"].target,
        stdout=asyncio.subprocess.PIPE,
    )
    printed, _ = await process.communicate()
    assert process.returncode == 0
    assert printed.decode().splitlines()[-1].endswith("goal_completed")


async def test_top_shows_every_tier_live(stack: Stack, http_server: HttpServer) -> None:
    http_server.routes["/n.json"] = reply(b'{"n": 1}')
    request = pb.CoordinateRequest(
        goal=f"fetch {http_server.url}/n.json then write a summary",
        agents=[pb.Agent(id="a", capabilities=["http", "writing"], max_concurrent_tasks=2)],
    )
    events = [event async for event in stack.coordinator.coordinate(request)]
    assert events[-1].HasField("goal_completed")
    code, output = await run_cli("top", "--target", stack.coordinate.target, "--frames", "1")
    assert code == 0, output
    for title in ("Coordinate", "Orchestrate", "Execute", "Active alerts"):
        assert title in output
    rows = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"│\s+(\w+)\s+[\d.,]+\s+([\d.,]+)\s+[\d.,]+\s+\d+", output)
    }
    assert rows["Coordinate"] > 0 and rows["StartRun"] > 0 and rows["Execute"] > 0  # p50 in ms, by method
    assert "active runs 0" in output and "RSS" in output


async def test_top_shows_what_to_do_about_each_alert(data_dir: Path) -> None:
    thresholds = Thresholds(memory_bytes=1)  # every server is above it
    settings = Settings(data_dir=data_dir, monitor_interval_seconds=0.1, alert_thresholds=thresholds)
    async with open_stack(settings) as stack, MonitorClient(stack.coordinate.target) as monitor:
        async for _ in monitor.watch_alerts():  # the first is raised
            break
        code, output = await run_cli("top", "--target", stack.coordinate.target, "--frames", "1")
    assert code == 0, output
    assert "HIGH_MEMORY_USAGE" in output
    advice = re.search(r"→ coordinate uses too much memory \(about [\d,]+ MiB less memory, [^;]+; effort low\)", output)
    assert advice is not None, output


async def test_goals_detach_and_are_listed_watched_shown_and_cancelled(
    tiers: dict[str, Process], http_server: HttpServer
) -> None:
    release = threading.Event()

    def hold(request: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        reply(b"{}")(request)

    http_server.routes["/hold"] = hold
    target = ("--target", tiers["coordinate"].target)
    code, output = await run_cli("goal", "write a haiku", "--agent", "w=writing", "--detach", *target)
    assert code == 0, output
    goal_id = output.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", goal_id), output
    code, output = await run_cli("goals", *target, "watch", goal_id)
    assert code == 0 and "goal completed" in output, output
    code, output = await run_cli("goals", *target, "get", goal_id)
    assert code == 0 and '"GOAL_STATE_COMPLETED"' in output and "write a haiku" in output, output
    try:
        held = f"fetch {http_server.url}/hold then write it up"
        code, output = await run_cli("goal", held, "--agent", "r=http,writing", "--detach", *target)
        waiting = output.strip()
        code, output = await run_cli("goals", *target, "list")
        assert code == 0 and waiting in output and goal_id in output, output
        code, output = await run_cli("goals", *target, "list", "--state", "completed")
        assert goal_id in output and waiting not in output, output
        code, output = await run_cli("goals", *target, "cancel", waiting, "--reason", "not needed")
        assert code == 0 and f"goal {waiting} is CANCELLED" in output, output
        code, output = await run_cli("goals", *target, "cancel", waiting)
        assert code == 1 and "ILLEGAL_TRANSITION" in output, output
    finally:
        release.set()
