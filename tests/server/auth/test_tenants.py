"""Tenants kept apart through the real servers: what one tenant starts, another cannot see, change or
reach by naming it (NOT_FOUND, as if it did not exist), whatever its key's role; a request id, an
execution id or a workspace named the same by two tenants stays two; and the tenant always comes
from the credential, across every hop."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Stack, open_stack
from tierstack.client import (
    CoordinatorClient,
    ExecutorClient,
    NotFoundError,
    OrchestratorClient,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from tierstack.core.values import JSON, from_value, to_struct
from tierstack.server import Settings
from tierstack.server.auth import Role, SqliteKeyStore, issue
from tierstack.server.execute import tool
from tierstack.server.execute.service import ExecuteService
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb
from tierstack.v1 import orchestrator_service_pb2 as pb

SECRET = "acme-only-4b1d"


@tool("bank.transfer", needs_approval=True)
async def transfer(amount: float) -> JSON:
    return {"sent": amount}


@dataclass
class Tenants:
    stack: Stack
    keys: dict[str, str]  # "tenant role" → token
    key_ids: dict[str, str]  # "tenant role" → key id


@pytest.fixture
async def tenants(tmp_path: Path) -> AsyncIterator[Tenants]:
    async with open_tenants(tmp_path) as opened:
        yield opened


@contextlib.asynccontextmanager
async def open_tenants(tmp_path: Path, **settings: Any) -> AsyncIterator[Tenants]:
    """Starts a stack with auth on and keys of every role for tenants acme and globex."""
    store = SqliteKeyStore.in_folder(tmp_path)
    await store.open()
    keys, key_ids = {}, {}
    try:
        grants = [("system", Role.TIER), *((t, r) for t in ("acme", "globex") for r in Role if r < Role.TIER)]
        for tenant, role in grants:
            issued = issue(tenant, role, role.name.lower())
            await store.add(issued)
            keys[f"{tenant} {role.name.lower()}"] = issued.token
            key_ids[f"{tenant} {role.name.lower()}"] = issued.key.key_id
    finally:
        await store.close()
    configured = Settings(data_dir=tmp_path, auth=True, tier_key=keys["system tier"], auth_cache_seconds=0, **settings)
    async with open_stack(configured) as stack:
        service = stack.execute.service
        assert isinstance(service, ExecuteService)
        service.registry.register(transfer)
        yield Tenants(stack, keys, key_ids)


def writes_then_waits(seconds: float) -> pb.Workflow:
    """A workflow that leaves a secret in its run's workspace, then sleeps."""
    return pb.Workflow(
        name="secretive",
        steps=[
            pb.WorkflowStep(
                id="write", tool="files.write", parameters=to_struct({"path": "secret.txt", "content": SECRET})
            ),
            pb.WorkflowStep(
                id="wait", tool="core.sleep", parameters=to_struct({"seconds": seconds}), depends_on=["write"]
            ),
        ],
    )


async def step_done(client: OrchestratorClient, run_id: str, step: str) -> None:
    async for event in client.watch_run(run_id):
        if event.WhichOneof("payload") == "step_completed" and event.step_completed.step_id == step:
            return
    raise AssertionError(f"the run ended before {step} completed")


async def refusal(call: Callable[[], Awaitable[Any]]) -> type[Exception] | None:
    try:
        await call()
    except (NotFoundError, PermissionDeniedError, UnauthenticatedError) as exc:
        return type(exc)
    return None


async def test_another_tenants_run_answers_not_found_to_every_call_and_leaks_nothing(tenants: Tenants) -> None:
    target = tenants.stack.orchestrate.target
    async with (
        OrchestratorClient(target, api_key=tenants.keys["acme run"]) as acme,
        OrchestratorClient(target, api_key=tenants.keys["acme read"]) as acme_reader,
        OrchestratorClient(target, api_key=tenants.keys["globex run"]) as globex,
        OrchestratorClient(target, api_key=tenants.keys["globex admin"]) as globex_admin,
        OrchestratorClient(target) as nobody,
    ):
        # The body names another tenant: the credential's wins.
        request = pb.StartRunRequest(
            request_id="nightly",
            workflow=writes_then_waits(60),
            context=common_pb2.RequestContext(tenant_id="globex", user_id="mallory"),
        )
        started = (await acme.start_run(request)).run
        assert (started.tenant_id, started.user_id) == ("acme", tenants.key_ids["acme run"])
        await step_done(acme, started.run_id, "write")
        run_id = started.run_id

        def calls(client: OrchestratorClient) -> dict[str, Callable[[], Awaitable[Any]]]:
            return {
                "GetRun": lambda: client.get_run(run_id),
                "WatchRun": lambda: anext(aiter(client.watch_run(run_id))),
                "ResolveVariables": lambda: client.resolve_variables(run_id, ["{{ steps.write.output }}"]),
                "PauseRun": lambda: client.pause_run(run_id),
                "ResumeRun": lambda: client.resume_run(run_id),
                "CancelRun": lambda: client.cancel_run(run_id),
                "DeleteRun": lambda: client.delete_run(run_id),
            }

        matrix: dict[str, dict[str, str]] = {}
        for who, client in (("no credential", nobody), ("other tenant", globex), ("other tenant admin", globex_admin)):
            matrix[who] = {name: getattr(await refusal(call), "__name__", "OK") for name, call in calls(client).items()}
        matrix["read role"] = {  # of acme itself: it may look, not act
            name: getattr(await refusal(call), "__name__", "OK")
            for name, call in calls(acme_reader).items()
            if name in ("GetRun", "PauseRun", "ResumeRun", "CancelRun", "DeleteRun")
        }
        assert matrix == {
            "no credential": dict.fromkeys(calls(nobody), "UnauthenticatedError"),
            "other tenant": dict.fromkeys(calls(globex), "NotFoundError"),
            "other tenant admin": dict.fromkeys(calls(globex), "NotFoundError"),
            "read role": {
                "GetRun": "OK",
                **dict.fromkeys(("PauseRun", "ResumeRun", "CancelRun", "DeleteRun"), "PermissionDeniedError"),
            },
        }, matrix
        assert (await acme.get_run(run_id)).state == pb.RUN_STATE_RUNNING  # none of it touched the run

        # Listing shows each tenant its own runs only; the same request id is each tenant's own.
        assert [run.run_id for run in (await globex.list_runs()).runs] == []
        theirs = await globex.start_run(pb.StartRunRequest(request_id="nightly", workflow=writes_then_waits(0)))
        assert theirs.created and theirs.run.run_id != run_id and theirs.run.tenant_id == "globex"
        again = await acme.start_run(pb.StartRunRequest(request_id="nightly", workflow=writes_then_waits(60)))
        assert not again.created and again.run.run_id == run_id
        assert [run.run_id for run in (await acme.list_runs()).runs] == [run_id]
        assert [run.run_id for run in (await globex.list_runs()).runs] == [theirs.run.run_id]
        assert (await acme.cancel_run(run_id)).state == pb.RUN_STATE_CANCELLED


async def test_a_workspace_is_the_one_the_server_derives_never_one_a_caller_names(tenants: Tenants) -> None:
    stack = tenants.stack
    async with (
        OrchestratorClient(stack.orchestrate.target, api_key=tenants.keys["acme run"]) as acme,
        ExecutorClient(stack.execute.target, api_key=tenants.keys["globex run"]) as globex,
        ExecutorClient(stack.execute.target, api_key=tenants.keys["acme run"]) as acme_direct,
    ):
        run = (await acme.start_run(pb.StartRunRequest(workflow=writes_then_waits(0)))).run
        async for _ in acme.watch_run(run.run_id):
            pass
        assert (await acme.get_run(run.run_id)).state == pb.RUN_STATE_COMPLETED

        def read(parent: str) -> executor_service_pb2.ExecuteToolRequest:
            return executor_service_pb2.ExecuteToolRequest(
                context=common_pb2.RequestContext(parent_execution_id=parent, correlation_id="c1"),
                call=common_pb2.ToolCall(tool="files.read", arguments=to_struct({"path": "secret.txt"})),
            )

        # Naming the run's id reaches no workspace of it: not from another tenant, nor from its own
        # tenant calling directly.
        for client in (globex, acme_direct):
            result = (await client.execute_tool(read(run.run_id))).result
            assert result.HasField("error") and SECRET not in str(result)
        # Two tenants writing under the same names keep two workspaces.
        write = executor_service_pb2.ExecuteToolRequest(
            context=common_pb2.RequestContext(parent_execution_id=run.run_id, correlation_id="c1"),
            call=common_pb2.ToolCall(tool="files.write", arguments=to_struct({"path": "secret.txt", "content": "x"})),
        )
        assert not (await globex.execute_tool(write)).result.HasField("error")
        assert (await acme_direct.execute_tool(read(run.run_id))).result.HasField("error")


async def test_execution_ids_and_approvals_are_each_tenants_own(tenants: Tenants) -> None:
    target = tenants.stack.execute.target

    def echo(text: str) -> executor_service_pb2.ExecuteRequest:
        return executor_service_pb2.ExecuteRequest(
            progress=True,
            execution_id="step-1",
            tool_calls=[common_pb2.ToolCall(tool="core.echo", arguments=to_struct({"value": text}))],
        )

    async def output(client: ExecutorClient, text: str) -> Any:
        outputs = [event.output.value async for event in client.execute(echo(text)) if event.HasField("output")]
        return from_value(outputs[-1])

    async with (
        ExecutorClient(target, api_key=tenants.keys["acme run"]) as acme,
        ExecutorClient(target, api_key=tenants.keys["globex run"]) as globex,
    ):
        assert await output(acme, "acme") == "acme"
        # The same execution id from another tenant runs its own step, never replays acme's.
        assert await output(globex, "globex") == "globex"
        assert await output(acme, "ignored") == "acme"  # acme's own replay

        # Another tenant cannot stop an execution in flight by naming its id.
        nap = executor_service_pb2.ExecuteRequest(
            progress=True,
            execution_id="nap-1",
            tool_calls=[common_pb2.ToolCall(tool="core.sleep", arguments=to_struct({"seconds": 0.5}))],
        )
        stream = aiter(acme.execute(nap))
        assert (await anext(stream)).WhichOneof("payload") == "started"
        assert not await globex.cancel_execution("nap-1")
        assert [event.WhichOneof("payload") async for event in stream][-1] == "completed"

        # A call waiting for approval can be answered by its own tenant only.
        pay = executor_service_pb2.ExecuteRequest(
            progress=True,
            execution_id="pay-1",
            tool_calls=[common_pb2.ToolCall(tool="bank.transfer", arguments=to_struct({"amount": 5}))],
        )
        events = []
        async for event in acme.execute(pay):
            events.append(event.WhichOneof("payload"))
            if event.HasField("approval_required"):
                approval_id = event.approval_required.approval_id
                assert await refusal(functools.partial(globex.approve_tool_call, approval_id)) is NotFoundError
                assert await refusal(functools.partial(globex.reject_tool_call, approval_id)) is NotFoundError
                await acme.approve_tool_call(approval_id)
        assert events[-1] == "completed"


async def test_what_a_step_learnt_for_one_tenant_never_steers_anothers(tenants: Tenants) -> None:
    """A step's track record (which strategy earned it, which tool calls it replays) is its tenant's."""
    request = executor_service_pb2.ExecuteRequest(
        progress=True, step_id="s", strategy=common_pb2.STRATEGY_CONVERSATIONAL, prompt="say hi", tools=["core.echo"]
    )

    async def chosen(client: ExecutorClient) -> common_pb2.Strategy.ValueType:
        events = [event async for event in client.execute(request)]
        return next(e.strategy_selected.chosen for e in events if e.HasField("strategy_selected"))

    target = tenants.stack.execute.target
    async with (
        ExecutorClient(target, api_key=tenants.keys["acme run"]) as acme,
        ExecutorClient(target, api_key=tenants.keys["globex run"]) as globex,
    ):
        for _ in range(10):
            assert await chosen(acme) == common_pb2.STRATEGY_CONVERSATIONAL
        assert await chosen(acme) == common_pb2.STRATEGY_REASONING  # graduated for acme
        assert await chosen(globex) == common_pb2.STRATEGY_CONVERSATIONAL


async def test_another_tenants_goal_answers_not_found(tenants: Tenants) -> None:
    target = tenants.stack.coordinate.target
    agents = [coordinator_pb.Agent(id="a", capabilities=["general", "analysis", "writing"], max_concurrent_tasks=4)]
    async with (
        CoordinatorClient(target, api_key=tenants.keys["acme run"]) as acme,
        CoordinatorClient(target, api_key=tenants.keys["globex run"]) as globex,
    ):
        request = coordinator_pb.StartGoalRequest(
            request_id="g", goal="analyze the logs and count the errors, then write a summary", agents=agents
        )
        goal = (await acme.start_goal(request)).goal
        assert goal.request.context.tenant_id == "acme"
        for call in (
            lambda: globex.get_goal(goal.goal_id),
            lambda: anext(aiter(globex.watch_goal(goal.goal_id))),
            lambda: globex.cancel_goal(goal.goal_id),
        ):
            assert await refusal(call) is NotFoundError
        assert [g.goal_id for g in (await globex.list_goals()).goals] == []
        theirs = await globex.start_goal(request)
        assert theirs.created and theirs.goal.goal_id != goal.goal_id
        events = [event async for event in acme.watch_goal(goal.goal_id)]
        assert events[-1].WhichOneof("payload") == "goal_completed", events[-1]
        # The goal's runs at Tier 2 are acme's too: its tenant crossed the hop in the tier's metadata.
        async with OrchestratorClient(tenants.stack.orchestrate.target, api_key=tenants.keys["acme read"]) as runs:
            listed = (await runs.list_runs()).runs
        assert listed and {run.tenant_id for run in listed} == {"acme"}


async def test_a_tenant_runs_at_most_its_quota_of_runs_at_once(tmp_path: Path) -> None:
    async with open_tenants(tmp_path, tenant_concurrent_runs=2) as tenants:
        target = tenants.stack.orchestrate.target
        async with (
            OrchestratorClient(target, api_key=tenants.keys["acme run"]) as acme,
            OrchestratorClient(target, api_key=tenants.keys["globex run"]) as globex,
        ):
            first, second = [
                (await acme.start_run(pb.StartRunRequest(request_id=f"r{n}", workflow=writes_then_waits(60)))).run
                for n in (1, 2)
            ]
            with pytest.raises(ResourceExhaustedError) as caught:
                await acme.start_run(pb.StartRunRequest(request_id="r3", workflow=writes_then_waits(0)))
            refused = caught.value
            assert refused.reason == "TOO_MANY_RUNS" and refused.retry_after
            assert [v.field for v in refused.violations] == ["concurrent_runs"]
            # A retry of a run already started is no new run; another tenant has a quota of its own.
            again = await acme.start_run(pb.StartRunRequest(request_id="r1", workflow=writes_then_waits(60)))
            assert not again.created and again.run.run_id == first.run_id
            assert (await globex.start_run(pb.StartRunRequest(workflow=writes_then_waits(0)))).created
            # A paused run still holds its place (it may resume); a cancelled one frees it.
            await acme.pause_run(second.run_id)
            with pytest.raises(ResourceExhaustedError):
                await acme.start_run(pb.StartRunRequest(request_id="r3", workflow=writes_then_waits(0)))
            await acme.cancel_run(first.run_id)
            third = await acme.start_run(pb.StartRunRequest(request_id="r3", workflow=writes_then_waits(0)))
            assert third.created
