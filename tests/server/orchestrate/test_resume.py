"""Runs survive a SIGKILL of the Orchestrate process: the restarted server resumes them, no step runs
twice (Execute finishes the steps whose caller died, and replays or joins them when asked again), and
every step's output is there at the end. Every second round has auth on: the resumed runs call Tier 3
for their own tenant, so that their steps' idempotency keys are the same as before the kill.

``TIERSTACK_RESUME_ROUNDS`` sets how many times the scenario runs (2 by default)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import HttpServer, echo, open_stack, slowly, spawn_tier, start_tier, stop, wait_for
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import OrchestratorClient
from tierstack.core.values import from_value, now_timestamp, to_struct
from tierstack.server import Settings
from tierstack.server.auth import Role, issue, key_store
from tierstack.server.orchestrate import SqliteRunStore, StoredRun
from tierstack.v1 import common_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb

ROUNDS = int(os.environ.get("TIERSTACK_RESUME_ROUNDS", "2"))
RUNS = 6
STEPS = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": ("d",), "f": ("e",)}


slow_echo = slowly(echo, 0.03)


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_runs_survive_a_sigkill_of_the_orchestrator(
    round_: int, tmp_path: Path, http_server: HttpServer, store_url: str
) -> None:
    paths = [f"/hit/r{run}/{name}" for run in range(RUNS) for name in STEPS]
    for path in paths:
        http_server.routes[path] = slow_echo
    wf = workflow(
        *(
            step(name, "http.request", depends_on=deps, url=f"{http_server.url}/hit/{{{{inputs.tag}}}}/{name}")
            for name, deps in STEPS.items()
        )
    )
    # Restarted under the same replica name, it resumes its runs at once, not once their leases pass.
    env = {**os.environ, "TIERSTACK_STORE_URL": store_url, "TIERSTACK_REPLICA_ID": "orchestrate-1"}
    settings = Settings(data_dir=tmp_path, store_url=store_url)
    api_key = ""
    if round_ % 2:
        keys = key_store(settings)
        await keys.open()
        tier, caller = issue("system", Role.TIER), issue("acme", Role.RUN)
        for issued in (tier, caller):
            await keys.add(issued)
        await keys.close()
        settings = dataclasses.replace(settings, auth=True, tier_key=tier.token)
        env |= {"TIERSTACK_AUTH": "on", "TIERSTACK_TIER_KEY": tier.token}
        api_key = caller.token
    execute = await start_tier("execute", settings)
    arguments = ("--execute-target", execute.target, "--data-dir", str(tmp_path))
    try:
        first = await spawn_tier("orchestrate", *arguments, env=env)
        async with OrchestratorClient(first.target, api_key=api_key) as client:
            run_ids = [
                (await client.start_run(pb.StartRunRequest(workflow=wf, inputs=to_struct({"tag": f"r{n}"})))).run.run_id
                for n in range(RUNS)
            ]
        await wait_for(lambda: len(http_server.hits) >= RUNS * len(STEPS) // 3, attempts=3000)
        first.process.kill()
        await stop(first)

        second = await spawn_tier("orchestrate", *arguments, env=env)
        try:
            async with OrchestratorClient(second.target, api_key=api_key) as client:
                histories = {run_id: [e async for e in client.watch_run(run_id)] for run_id in run_ids}
                runs = {run_id: await client.get_run(run_id) for run_id in run_ids}
        finally:
            assert await stop(second) == 0
    finally:
        await execute.stop()

    hits = Counter(http_server.hits)
    resumed_somewhere = False
    for number, run_id in enumerate(run_ids):
        history, run = histories[run_id], runs[run_id]
        assert run.state == pb.RUN_STATE_COMPLETED, run
        assert history[-1].HasField("run_completed")
        assert [e.sequence for e in history] == sorted({e.sequence for e in history})
        completions = Counter(e.step_completed.step_id for e in history if e.HasField("step_completed"))
        assert completions == dict.fromkeys(STEPS, 1), "every step completes exactly once"
        outputs = {name: from_value(value) for name, value in run.outputs.items()}
        assert {name: out["json"]["path"] for name, out in outputs.items()} == {  # type: ignore[index, call-overload]
            name: f"/hit/r{number}/{name}" for name in STEPS
        }
        if not any(e.HasField("run_resumed") for e in history):
            continue  # the run had ended before the kill
        resumed_somewhere = True
    # Not even a step in flight at the kill runs twice: Execute went on with it, and gave its end when asked again.
    assert all(hits[path] == 1 for path in paths), {path: hits[path] for path in paths if hits[path] != 1}
    assert resumed_somewhere, "the kill came after every run had ended; nothing was resumed"


async def test_a_stored_run_that_cannot_resume_is_failed_and_the_server_starts(tmp_path: Path) -> None:
    store = SqliteRunStore(tmp_path / "runs.sqlite3")
    await store.open()
    try:
        for run_id, limits in (
            ("bad", common_pb2.ResourceLimits(max_parallelism=-1)),
            ("good", common_pb2.ResourceLimits()),
        ):
            run = pb.Run(run_id=run_id, workflow_name="w", state=pb.RUN_STATE_RUNNING, create_time=now_timestamp())
            run.steps.add(step_id="a", state=pb.STEP_STATE_PENDING)
            await store.create_run(StoredRun(run, workflow(step("a", "core.echo", value=1)), limits), "earlier")
        # A record that cannot be read back at all, as a damaged file could hold.
        await store._conn.execute(
            "INSERT INTO runs (run_id, state, create_ns, run, workflow, limits) VALUES (?, ?, ?, ?, ?, ?)",
            ("torn", pb.RUN_STATE_RUNNING, 1, b"\xff\xff\xff", b"", b""),
        )
        await store._conn.commit()
    finally:
        await store.close()
    async with open_stack(Settings(data_dir=tmp_path)) as stack:
        bad = await stack.orchestrator.get_run("bad")
        torn = await stack.orchestrator.get_run("torn")  # readable again, failed
        listed = {run.run_id for run in (await stack.orchestrator.list_runs()).runs}
        await stack.orchestrator.delete_run("torn")
        async for _ in stack.orchestrator.watch_run("good"):
            pass
        good = await stack.orchestrator.get_run("good")
    assert bad.state == pb.RUN_STATE_FAILED
    assert bad.error.reason == "RUN_NOT_RESUMABLE"
    assert "limits.max_parallelism" in bad.error.message
    assert good.state == pb.RUN_STATE_COMPLETED
    assert (torn.state, torn.error.reason) == (pb.RUN_STATE_FAILED, "RUN_NOT_RESUMABLE")
    assert listed == {"bad", "good", "torn"}
