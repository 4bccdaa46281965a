"""Two Orchestrate replicas on one PostgreSQL database: watch, pause, resume and cancel work on the
replica that does not drive the run, and a SIGKILLed replica's runs are taken over by the survivor
once their leases pass, every step's side effect happening once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.helpers import HttpServer, echo, reply, spawn_tier, start_tier, stop, wait_for
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import OrchestratorClient
from tierstack.core.values import to_struct
from tierstack.server import Settings, TierServer
from tierstack.v1 import orchestrator_service_pb2 as pb
from tools.postgres import LocalPostgres

LEASE = 1.0


@pytest.fixture
def gate(http_server: HttpServer) -> Iterator[threading.Event]:
    """``/hold`` and ``/block`` answer once the gate opens; ``/after`` at once."""
    opened = threading.Event()

    def hold(request: BaseHTTPRequestHandler) -> None:
        opened.wait(30)
        reply(b'{"held": true}')(request)

    http_server.routes["/hold"] = http_server.routes["/block"] = hold
    http_server.routes["/after"] = echo
    yield opened
    opened.set()


@pytest.fixture
async def replicas(
    postgres_server: LocalPostgres, tmp_path: Path
) -> AsyncIterator[tuple[TierServer, OrchestratorClient, OrchestratorClient]]:
    """One Execute and two Orchestrate replicas sharing a database; yields Execute and a client of each
    replica."""
    settings = Settings(data_dir=tmp_path, store_url=postgres_server.new_database(), lease_seconds=LEASE)
    execute = await start_tier("execute", settings)
    wired = dataclasses.replace(settings, execute_target=execute.target)
    first, second = [await start_tier("orchestrate", wired) for _ in range(2)]
    clients = OrchestratorClient(first.target), OrchestratorClient(second.target)
    try:
        yield execute, *clients
    finally:
        for client in clients:
            await client.close()
        for server in (first, second, execute):
            await server.stop()


def held_workflow(http_server: HttpServer, hold: str = "/hold") -> pb.Workflow:
    return workflow(
        step("hold", "http.request", url=f"{http_server.url}{hold}"),
        step("after", "http.request", depends_on=("hold",), url=f"{http_server.url}/after"),
    )


async def test_a_run_is_watched_paused_resumed_and_cancelled_from_the_other_replica(
    replicas: tuple[TierServer, OrchestratorClient, OrchestratorClient],
    http_server: HttpServer,
    gate: threading.Event,
) -> None:
    _, driver, other = replicas
    run_id = (await driver.start_run(pb.StartRunRequest(workflow=held_workflow(http_server)))).run.run_id
    await wait_for(lambda: "/hold" in http_server.hits)
    seen: list[pb.RunEvent] = []

    async def watch() -> None:
        async for event in other.watch_run(run_id):
            seen.append(event)

    watcher = asyncio.create_task(watch())
    await wait_for(lambda: any(e.HasField("step_started") for e in seen))  # live, through the store

    paused = await other.pause_run(run_id, reason="look first")
    assert paused.state == pb.RUN_STATE_PAUSED
    await watcher  # a watch ends when the run pauses, as on the replica driving it
    assert seen[-1].HasField("run_paused")

    resumed = await other.resume_run(run_id)  # now driven by the other replica
    assert resumed.state == pb.RUN_STATE_RUNNING
    gate.set()
    history = [event async for event in driver.watch_run(run_id)]  # watched from the first one now
    assert history[-1].HasField("run_completed")
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert (await driver.get_run(run_id)).state == pb.RUN_STATE_COMPLETED

    gate.clear()
    request = pb.StartRunRequest(workflow=held_workflow(http_server, "/block"))
    blocked = (await other.start_run(request)).run.run_id
    await wait_for(lambda: "/block" in http_server.hits)
    cancelled = await driver.cancel_run(blocked, reason="not needed")  # driven by the other replica
    assert cancelled.state == pb.RUN_STATE_CANCELLED
    history = [event async for event in driver.watch_run(blocked)]
    assert history[-1].run_cancelled.reason == "not needed"


async def test_runs_of_a_killed_replica_are_taken_over_by_the_survivor(
    postgres_server: LocalPostgres, tmp_path: Path, http_server: HttpServer
) -> None:
    paths = [f"/hit/r{run}/{name}" for run in range(6) for name in "abc"]
    for path in paths:
        http_server.routes[path] = echo
    wf = workflow(
        *(
            step(name, "http.request", depends_on=deps, url=f"{http_server.url}/hit/{{{{inputs.tag}}}}/{name}")
            for name, deps in (("a", ()), ("b", ("a",)), ("c", ("b",)))
        )
    )
    url = postgres_server.new_database()
    env = {**os.environ, "TIERSTACK_STORE_URL": url, "TIERSTACK_LEASE_SECONDS": str(LEASE)}
    execute = await start_tier("execute", Settings(data_dir=tmp_path / "execute"))
    arguments = ("--execute-target", execute.target, "--data-dir", str(tmp_path))
    try:
        doomed = await spawn_tier("orchestrate", *arguments, env=env)
        survivor = await spawn_tier("orchestrate", *arguments, env=env)
        async with OrchestratorClient(doomed.target) as client:
            run_ids = [
                (await client.start_run(pb.StartRunRequest(workflow=wf, inputs=to_struct({"tag": f"r{n}"})))).run.run_id
                for n in range(6)
            ]
        await wait_for(lambda: len(http_server.hits) >= 4, attempts=3000)
        doomed.process.kill()
        await stop(doomed)
        try:
            async with OrchestratorClient(survivor.target) as client:
                histories = {run_id: [e async for e in client.watch_run(run_id)] for run_id in run_ids}
                runs = [await client.get_run(run_id) for run_id in run_ids]
        finally:
            assert await stop(survivor) == 0
    finally:
        await execute.stop()
    assert [run.state for run in runs] == [pb.RUN_STATE_COMPLETED] * 6
    for history in histories.values():
        assert Counter(e.step_completed.step_id for e in history if e.HasField("step_completed")) == dict.fromkeys(
            "abc", 1
        )
    assert any(e.HasField("run_resumed") for history in histories.values() for e in history)
    assert Counter(http_server.hits) == dict.fromkeys(paths, 1)
