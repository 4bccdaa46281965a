"""files.write / files.read: one workspace per run, and no way out of it."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import Stack
from tests.server.orchestrate.workflows import step, workflow
from tierstack.core.values import from_value, to_struct
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb


async def test_the_steps_of_a_run_share_a_workspace(stack: Stack, data_dir: Path) -> None:
    wf = workflow(
        step("write", "files.write", path="notes/today.txt", content="{{inputs.text}}"),
        step("append", "files.write", depends_on=("write",), path="notes/today.txt", content="!", append=True),
        step("read", "files.read", depends_on=("append",), path="notes/today.txt"),
    )
    first = [
        e
        async for e in stack.orchestrator.orchestrate(
            pb.OrchestrateRequest(workflow=wf, inputs=to_struct({"text": "hi"}))
        )
    ]
    outputs = {k: from_value(v) for k, v in first[-1].run_completed.outputs.items()}
    assert outputs["read"] == "hi!"
    assert outputs["write"] == {"path": "notes/today.txt", "characters": 2}
    run_id = first[-1].run_id
    assert (data_dir / "workspaces" / run_id / "notes" / "today.txt").read_text() == "hi!"

    other = [
        e
        async for e in stack.orchestrator.orchestrate(
            pb.OrchestrateRequest(workflow=workflow(step("read", "files.read", path="notes/today.txt")))
        )
    ]
    assert other[-1].run_failed.error.reason == "FILE_NOT_FOUND"


async def test_no_path_leads_out_of_the_workspace(stack: Stack, data_dir: Path, tmp_path: Path) -> None:
    context = common_pb2.RequestContext(parent_execution_id="run-7")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    workspace = data_dir / "workspaces" / "run-7"
    workspace.mkdir(parents=True)
    os.symlink(outside, workspace / "link.txt")
    for path in ("../run-8/x.txt", str(outside), "link.txt", "."):
        for tool, arguments in (("files.read", {"path": path}), ("files.write", {"path": path, "content": "x"})):
            response = await stack.executor.execute_tool(
                executor_service_pb2.ExecuteToolRequest(
                    context=context, call=common_pb2.ToolCall(tool=tool, arguments=to_struct(arguments))
                )
            )
            assert response.result.error.reason == "PATH_OUTSIDE_WORKSPACE", (tool, path)
    assert outside.read_text() == "secret"
