"""Runs survive a SIGKILL of the Execute process: Orchestrate asks for each lost step again under the
same execution id until Execute is back, the restarted Execute replays the executions it had finished
instead of running them again, and every run completes with every output."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from tests.helpers import HttpServer, echo, free_port, slowly, spawn_tier, stop, wait_for
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import OrchestratorClient
from tierstack.core.values import from_value, to_struct
from tierstack.server.execute.store import SqliteExecutionStore
from tierstack.v1 import orchestrator_service_pb2 as pb

RUNS = 30
STEPS = {"a": (), "b": ("a",), "c": ("b",)}


slow_echo = slowly(echo, 0.05)


async def _finished_before_the_kill(path: Path) -> set[str]:
    store = SqliteExecutionStore(path)
    await store.open()
    try:
        async with store._conn.execute("SELECT execution_id FROM executions") as rows:
            return {row[0] for row in await rows.fetchall()}
    finally:
        await store.close()


async def test_runs_survive_a_sigkill_of_the_executor(tmp_path: Path, http_server: HttpServer) -> None:
    for number in range(RUNS):
        for name in STEPS:
            http_server.routes[f"/hit/r{number}/{name}"] = slow_echo
    wf = workflow(
        *(
            step(name, "http.request", depends_on=deps, url=f"{http_server.url}/hit/{{{{inputs.tag}}}}/{name}")
            for name, deps in STEPS.items()
        )
    )
    env = {**os.environ}
    port = free_port()
    execute_data = ("--port", str(port), "--data-dir", str(tmp_path / "execute"))
    execute = await spawn_tier("execute", *execute_data, env=env)
    orchestrate = await spawn_tier(
        "orchestrate", "--execute-target", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "orchestrate"), env=env
    )
    try:
        async with OrchestratorClient(orchestrate.target) as client:
            run_ids = [
                (await client.start_run(pb.StartRunRequest(workflow=wf, inputs=to_struct({"tag": f"r{n}"})))).run.run_id
                for n in range(RUNS)
            ]
            await wait_for(lambda: len(http_server.hits) >= RUNS, attempts=3000)
            execute.process.kill()
            await stop(execute)
            finished = await _finished_before_the_kill(tmp_path / "execute" / "executions.sqlite3")
            execute = await spawn_tier("execute", *execute_data, env=env)
            histories = {run_id: [e async for e in client.watch_run(run_id)] for run_id in run_ids}
            runs = {run_id: await client.get_run(run_id) for run_id in run_ids}
    finally:
        assert await stop(orchestrate) == 0
        await stop(execute)

    assert finished, "the kill came before Execute had finished any step"
    hits = Counter(http_server.hits)
    for number, run_id in enumerate(run_ids):
        history, run = histories[run_id], runs[run_id]
        assert run.state == pb.RUN_STATE_COMPLETED, run
        completions = Counter(e.step_completed.step_id for e in history if e.HasField("step_completed"))
        assert completions == dict.fromkeys(STEPS, 1), "every step completes exactly once"
        outputs = {name: from_value(value) for name, value in run.outputs.items()}
        assert {name: out["json"]["path"] for name, out in outputs.items()} == {  # type: ignore[index, call-overload]
            name: f"/hit/r{number}/{name}" for name in STEPS
        }
        for name in STEPS:
            path = f"/hit/r{number}/{name}"
            # An execution Execute had finished is replayed, never run again; one in flight at the kill may be.
            assert hits[path] == 1 if f"{run_id}/{name}/1" in finished else hits[path] >= 1, (path, hits[path])
