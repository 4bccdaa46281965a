"""Finished runs (with their events) and unused workspaces go: on request (DeleteRun) and once the
retention has passed; runs that have not ended stay."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.helpers import HttpServer, Stack, open_stack
from tests.server.orchestrate.test_orchestrator_service import hold_until_released
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import FailedPreconditionError, NotFoundError
from tierstack.server import Settings
from tierstack.v1 import orchestrator_service_pb2 as pb


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def finished_run(stack: Stack, *, request_id: str = "") -> str:
    started = await stack.orchestrator.start_run(
        pb.StartRunRequest(workflow=workflow(step("a", value=1)), request_id=request_id)
    )
    events = [event async for event in stack.orchestrator.watch_run(started.run.run_id)]
    assert events[-1].HasField("run_completed")
    return started.run.run_id


async def listed(stack: Stack) -> list[str]:
    return [run.run_id for run in (await stack.orchestrator.list_runs()).runs]


async def test_delete_run_removes_a_finished_run_and_frees_its_request_id(
    stack: Stack, http_server: HttpServer
) -> None:
    run_id = await finished_run(stack, request_id="nightly")
    kept = await finished_run(stack)
    await stack.orchestrator.delete_run(run_id)
    with pytest.raises(NotFoundError):
        await stack.orchestrator.get_run(run_id)
    with pytest.raises(NotFoundError):
        [event async for event in stack.orchestrator.watch_run(run_id)]
    with pytest.raises(NotFoundError):
        await stack.orchestrator.delete_run(run_id)
    assert await listed(stack) == [kept]
    again = await stack.orchestrator.start_run(
        pb.StartRunRequest(workflow=workflow(step("a", value=1)), request_id="nightly")
    )
    assert again.created and again.run.run_id != run_id

    release = hold_until_released(http_server, "/hold")
    held = workflow(step("wait", "http.request", url=f"{http_server.url}/hold"))
    running = await stack.orchestrator.start_run(pb.StartRunRequest(workflow=held))
    try:
        with pytest.raises(FailedPreconditionError) as refused:
            await stack.orchestrator.delete_run(running.run.run_id)
        assert refused.value.reason == "RUN_NOT_FINISHED"
    finally:
        release.set()
    assert (await stack.orchestrator.get_run(running.run.run_id)).run_id == running.run.run_id


async def test_finished_runs_and_idle_workspaces_go_once_the_retention_has_passed(
    data_dir: Path, tmp_path: Path, http_server: HttpServer
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    async with open_stack(Settings(data_dir=data_dir, retention_seconds=0.5)) as stack:
        release = hold_until_released(http_server, "/hold")
        held = workflow(step("wait", "http.request", url=f"{http_server.url}/hold"))
        running = await stack.orchestrator.start_run(pb.StartRunRequest(workflow=held))
        try:
            writes = workflow(step("write", "files.write", path="notes.txt", content="hello"))
            started = await stack.orchestrator.start_run(pb.StartRunRequest(workflow=writes))
            run_id = started.run.run_id
            [event async for event in stack.orchestrator.watch_run(run_id)]
            workspace = data_dir / "workspaces" / run_id
            assert (workspace / "notes.txt").read_text() == "hello"
            # Links inside a workspace, and beside it, are removed without following them.
            os.symlink(outside, workspace / "link")
            os.symlink(outside, data_dir / "workspaces" / "a-link")

            async def gone() -> bool:
                return run_id not in await listed(stack) and not workspace.exists()

            await eventually(gone)
            with pytest.raises(NotFoundError):
                await stack.orchestrator.get_run(run_id)
            assert (outside / "precious.txt").read_text() == "keep me"
            assert (data_dir / "workspaces" / "a-link").is_symlink()
            # The run that has not ended stays, however long it has been running.
            assert (await stack.orchestrator.get_run(running.run.run_id)).state == pb.RUN_STATE_RUNNING
        finally:
            release.set()
