"""Goals survive a SIGKILL of the Coordinate process: the restarted server takes up the goal where
it stood, subtasks that had finished are not run again, and the run in flight is watched again,
not started again."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.helpers import HttpServer, spawn_tier, spawned_stack, stop, wait_for
from tierstack.client import CoordinatorClient, OrchestratorClient
from tierstack.client.values import from_value
from tierstack.v1 import coordinator_service_pb2 as pb

#: A chain with a fork: a; b and c after a; d after both; e after d; f after e.
SUBTASKS = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": ("d",), "f": ("e",)}


def slow_echo(request: BaseHTTPRequestHandler) -> None:
    time.sleep(0.3)  # this handler runs in the HTTP server's own thread
    body = json.dumps({"path": request.path}).encode()
    request.send_response(200)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


def chain_template(folder: Path) -> None:
    folder.mkdir()
    lines = [
        f"  - {{id: {name}, description: fetch {name}, required_capabilities: [http], tool: http.request,"
        f" dependencies: [{', '.join(deps)}], parameters: {{url: '${{base}}/{name}'}}}}"
        for name, deps in SUBTASKS.items()
    ]
    (folder / "chain.yaml").write_text(
        "name: chain\npattern: '^fetch the chain at (?P<base>\\S+)$'\nsubtasks:\n" + "\n".join(lines)
    )


async def test_a_goal_survives_a_sigkill_of_the_coordinator(tmp_path: Path, http_server: HttpServer) -> None:
    for name in SUBTASKS:
        http_server.routes[f"/chain/{name}"] = slow_echo
    chain_template(tmp_path / "templates")
    env = {**os.environ, "TIERSTACK_TEMPLATES_DIR": str(tmp_path / "templates")}
    data = tmp_path / "data"
    agents = [pb.Agent(id="fetcher", capabilities=["http"], max_concurrent_tasks=6)]
    async with spawned_stack(data, env) as started:
        first = started["coordinate"]
        async with CoordinatorClient(first.target) as client:
            request = pb.StartGoalRequest(goal=f"fetch the chain at {http_server.url}/chain", agents=agents)
            goal_id = (await client.start_goal(request)).goal.goal_id
            before: list[pb.GoalEvent] = []
            async for event in client.watch_goal(goal_id):
                before.append(event)
                if sum(e.HasField("subtask_finished") for e in before) == 3:
                    break  # a, then b and c: d is next
        finished_before = {e.subtask_finished.subtask_id for e in before if e.HasField("subtask_finished")}
        await wait_for(lambda: "/chain/d" in http_server.hits, attempts=3000)  # d is in flight
        first.process.kill()
        await stop(first)

        second = await spawn_tier(
            "coordinate",
            "--orchestrate-target",
            started["orchestrate"].target,
            "--execute-target",
            started["execute"].target,
            "--data-dir",
            str(data),
            env=env,
        )
        started["coordinate"] = second  # stopped with the rest
        async with CoordinatorClient(second.target) as client:
            history = [e async for e in client.watch_goal(goal_id)]
            goal = await client.get_goal(goal_id)
        async with OrchestratorClient(started["orchestrate"].target) as orchestrator:
            runs = (await orchestrator.list_runs()).runs

    assert goal.state == pb.GOAL_STATE_COMPLETED, goal
    assert history[-1].HasField("goal_completed")
    assert [e.sequence for e in history] == list(range(1, len(history) + 1)), "a gap-free history across the kill"
    assert history[: len(before)] == before, "what a watcher saw before the kill is what is stored"
    [resumed] = [e.goal_resumed for e in history if e.HasField("goal_resumed")]
    assert resumed.finished_subtasks >= len(finished_before) == 3
    outputs = {name: from_value(value) for name, value in goal.outputs.items()}
    paths = {name: output["json"]["path"] for name, output in outputs.items()}  # type: ignore[call-overload, index]
    assert paths == {name: f"/chain/{name}" for name in SUBTASKS}
    finished = Counter(e.subtask_finished.subtask_id for e in history if e.HasField("subtask_finished"))
    assert finished == dict.fromkeys(SUBTASKS, 1), "every subtask finishes once"
    # No subtask's call happened twice: finished ones were not run again, and d, in flight at the
    # kill, was watched again rather than started again.
    assert Counter(http_server.hits) == {f"/chain/{name}": 1 for name in SUBTASKS}
    assert len(runs) == len(SUBTASKS)
    started_runs = {
        e.subtask_started.subtask_id: e.subtask_started.run_id for e in history if e.HasField("subtask_started")
    }
    assert set(started_runs) == set(SUBTASKS) and set(started_runs.values()) == {run.run_id for run in runs}
