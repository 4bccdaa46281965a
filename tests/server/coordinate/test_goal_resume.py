"""Goals survive a SIGKILL of the Coordinate process: the restarted server takes up the goal where
it stood, subtasks that had finished are not run again, and the run in flight is watched again,
not started again. They survive one of the Orchestrate process too: Coordinate watches its runs
again, from the last event it saw, once Orchestrate is back."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from tests.helpers import (
    HttpServer,
    echo,
    free_port,
    open_stack,
    slowly,
    spawn_tier,
    spawned_stack,
    start_tier,
    stop,
    wait_for,
)
from tierstack.client import CoordinatorClient, OrchestratorClient
from tierstack.core.values import from_value, now_timestamp
from tierstack.server import Settings
from tierstack.server.coordinate import SqliteGoalStore
from tierstack.v1 import coordinator_service_pb2 as pb

#: A chain with a fork: a; b and c after a; d after both; e after d; f after e.
SUBTASKS = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": ("d",), "f": ("e",)}


slow_echo = slowly(echo, 0.3)


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


async def test_a_goal_survives_a_sigkill_of_the_coordinator(
    tmp_path: Path, http_server: HttpServer, store_url: str
) -> None:
    for name in SUBTASKS:
        http_server.routes[f"/chain/{name}"] = slow_echo
    chain_template(tmp_path / "templates")
    env = {**os.environ, "TIERSTACK_TEMPLATES_DIR": str(tmp_path / "templates"), "TIERSTACK_STORE_URL": store_url}
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


async def test_a_goal_watches_its_runs_again_across_a_sigkill_of_the_orchestrator(
    tmp_path: Path, http_server: HttpServer
) -> None:
    for name in SUBTASKS:
        http_server.routes[f"/chain/{name}"] = slow_echo
    chain_template(tmp_path / "templates")
    data = tmp_path / "data"
    port = free_port()
    execute = await start_tier("execute", Settings())
    arguments = ("--port", str(port), "--execute-target", execute.target, "--data-dir", str(data))
    orchestrate = await spawn_tier("orchestrate", *arguments, env=dict(os.environ))
    settings = Settings(data_dir=data, templates_dir=tmp_path / "templates", orchestrate_target=f"127.0.0.1:{port}")
    coordinate = await start_tier("coordinate", settings)
    try:
        async with CoordinatorClient(coordinate.target) as client:
            agents = [pb.Agent(id="fetcher", capabilities=["http"], max_concurrent_tasks=6)]
            request = pb.StartGoalRequest(goal=f"fetch the chain at {http_server.url}/chain", agents=agents)
            goal_id = (await client.start_goal(request)).goal.goal_id
            seen: list[pb.GoalEvent] = []
            async for event in client.watch_goal(goal_id):
                seen.append(event)
                if sum(e.HasField("subtask_finished") for e in seen) == 3:
                    break
            await wait_for(lambda: "/chain/d" in http_server.hits, attempts=3000)
            orchestrate.process.kill()
            await stop(orchestrate)
            orchestrate = await spawn_tier("orchestrate", *arguments, env=dict(os.environ))
            history = [e async for e in client.watch_goal(goal_id)]
            goal = await client.get_goal(goal_id)
    finally:
        await coordinate.stop()
        await stop(orchestrate)
        await execute.stop()

    assert goal.state == pb.GOAL_STATE_COMPLETED, goal
    assert set(goal.outputs) == set(SUBTASKS)
    finished = Counter(e.subtask_finished.subtask_id for e in history if e.HasField("subtask_finished"))
    assert finished == dict.fromkeys(SUBTASKS, 1)
    started = Counter(e.subtask_started.subtask_id for e in history if e.HasField("subtask_started"))
    assert started == dict.fromkeys(SUBTASKS, 1), "no subtask got a second run: d's run was watched again"
    hits = Counter(http_server.hits)
    assert all(hits[f"/chain/{name}"] == 1 for name in ("a", "b", "c", "e", "f")), hits
    assert hits["/chain/d"] >= 1  # in flight in Tier 2 at the kill: Tier 2 decides whether it runs again
    # d's run events reached the goal once each, across the dropped stream.
    d_run = [e.subtask_progress.run_event for e in history if e.subtask_progress.subtask_id == "d"]
    assert [e.sequence for e in d_run] == list(range(1, len(d_run) + 1))
    assert any(e.HasField("run_resumed") for e in d_run)


async def test_a_stored_goal_that_cannot_resume_is_failed_and_the_server_starts(tmp_path: Path) -> None:
    store = SqliteGoalStore(tmp_path / "goals.sqlite3")
    await store.open()
    try:
        for goal_id in ("good", "unreadable-events"):
            goal = pb.Goal(goal_id=goal_id, state=pb.GOAL_STATE_PENDING, create_time=now_timestamp())
            goal.request.goal = "write a haiku"
            goal.request.agents.add(id="w", capabilities=["writing"])
            await store.create_goal(goal, "a previous server")
        # Records that cannot be read back at all, as a damaged file could hold.
        await store._conn.execute(
            "INSERT INTO goal_events (goal_id, sequence, event) VALUES (?, ?, ?)",
            ("unreadable-events", 1, b"\xff\xff\xff"),
        )
        await store._conn.execute("UPDATE goals SET last_sequence = 1 WHERE goal_id = 'unreadable-events'")
        await store._conn.execute(
            "INSERT INTO goals (goal_id, state, create_ns, owner, epoch, last_sequence, goal)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("torn", pb.GOAL_STATE_RUNNING, 1, "a previous server", 1, 0, b"\xff\xff\xff"),
        )
        await store._conn.commit()
    finally:
        await store.close()
    async with open_stack(Settings(data_dir=tmp_path)) as stack:
        history = [e async for e in stack.coordinator.watch_goal("good")]
        good = await stack.coordinator.get_goal("good")
        bad = await stack.coordinator.get_goal("unreadable-events")
        running = await stack.coordinator.list_goals(pb.ListGoalsRequest(state=pb.GOAL_STATE_RUNNING))
    assert good.state == pb.GOAL_STATE_COMPLETED
    assert history[0].HasField("goal_resumed") and history[-1].HasField("goal_completed")
    assert bad.state == pb.GOAL_STATE_FAILED and bad.error.reason == "GOAL_NOT_RESUMABLE"
    assert not running.goals  # the torn record was marked failed, not left running
