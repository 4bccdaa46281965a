"""A run store that fails or falls behind, through a real Orchestrate server (and the run manager):
the server says so, holds new steps, and stores every accepted event once the store is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import FlakyStore, start_tier, wait_for
from tests.server.orchestrate.test_engine import Tools, registry
from tests.server.orchestrate.workflows import step, workflow
from tierstack.client import MonitorClient, OrchestratorClient
from tierstack.core.values import to_seconds
from tierstack.server import Settings, TierServer
from tierstack.server.execute import Executor
from tierstack.server.orchestrate import RunManager, SqliteRunStore
from tierstack.server.orchestrate.service import OrchestrateService
from tierstack.v1 import common_pb2
from tierstack.v1 import monitor_service_pb2 as monitor_pb
from tierstack.v1 import orchestrator_service_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Orchestrate:
    execute: TierServer
    server: TierServer
    store: FlakyStore
    orchestrator: OrchestratorClient
    monitor: MonitorClient
    health: health_pb2_grpc.HealthStub

    async def status(self) -> int:
        return int((await self.health.Check(health_pb2.HealthCheckRequest(service=""))).status)

    async def metrics(self) -> monitor_pb.OrchestrateMetrics:
        [tier] = (await self.monitor.get_metrics()).tiers
        return tier.orchestrate


@pytest.fixture
async def orchestrate(data_dir: Path) -> AsyncIterator[Orchestrate]:
    execute = await start_tier("execute", Settings(data_dir=data_dir))
    store = FlakyStore(SqliteRunStore(data_dir / "runs.sqlite3"))
    settings = Settings(data_dir=data_dir, execute_target=execute.target)
    server = TierServer(OrchestrateService(settings, store=store), grace_seconds=1.0, metrics_port=0)
    await server.start()
    channel = grpc.aio.insecure_channel(server.target)
    opened = Orchestrate(
        execute,
        server,
        store,
        OrchestratorClient(server.target),
        MonitorClient(server.target),
        health_pb2_grpc.HealthStub(channel),
    )
    try:
        yield opened
    finally:
        await opened.orchestrator.close()
        await opened.monitor.close()
        await channel.close()
        await server.stop()
        await execute.stop()


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_a_failing_store_turns_the_server_not_serving_until_it_is_back_and_loses_nothing(
    orchestrate: Orchestrate,
) -> None:
    assert await orchestrate.status() == SERVING
    orchestrate.store.failing = True
    chain = workflow(step("a", value=1), step("b", depends_on=("a",), value=2), step("c", depends_on=("b",), value=3))
    started = await orchestrate.orchestrator.start_run(pb.StartRunRequest(workflow=chain))
    run_id = started.run.run_id

    async def not_serving() -> bool:
        return bool(await orchestrate.status() == NOT_SERVING)

    await eventually(not_serving)
    metrics = await orchestrate.metrics()
    assert metrics.store_failing and metrics.store_write_failures > 0 and metrics.queued_events > 0
    assert (to_seconds(metrics.store_write_age) or 0.0) > 0.0
    assert (await orchestrate.orchestrator.get_run(run_id)).state == pb.RUN_STATE_RUNNING
    async with httpx.AsyncClient(trust_env=False) as client:
        scraped = (await client.get(f"http://127.0.0.1:{orchestrate.server.metrics_port}/metrics")).text
    assert 'tierstack_store_failing{tier="orchestrate"} 1.0' in scraped

    orchestrate.store.failing = False
    events = [event async for event in orchestrate.orchestrator.watch_run(run_id)]
    assert events[-1].HasField("run_completed")
    assert await orchestrate.status() == SERVING
    stored = await orchestrate.store.events(run_id, after_sequence=0)
    assert [e.sequence for e in stored] == list(range(1, len(stored) + 1)) == [e.sequence for e in events]
    assert [e.WhichOneof("payload") for e in stored].count("step_completed") == 3
    metrics = await orchestrate.metrics()
    assert not metrics.store_failing and metrics.queued_events == 0


async def test_new_steps_wait_while_the_store_falls_behind_and_nothing_is_dropped(tmp_path: Path) -> None:
    store = FlakyStore(SqliteRunStore(tmp_path / "runs.sqlite3"))
    await store.open()
    tools = Tools()
    manager = RunManager(store, Executor(registry(tools)), max_queued_events=4)
    await manager.open()
    try:
        steps = [step(f"s{index}", depends_on=("gate",), value=index) for index in range(10)]
        run, _ = await manager.start_run(
            workflow=workflow(step("gate", "test.hold", id="gate"), *steps),
            inputs=pb.StartRunRequest().inputs,
            limits=common_pb2.ResourceLimits(),
            context=common_pb2.RequestContext(),
        )
        await wait_for(lambda: ("start", "gate") in tools.log)  # the run has started and waits at its gate
        store.held.clear()  # the store stops answering
        tools.gate.set()
        await wait_for(lambda: manager.log.queued >= 4)
        for _ in range(50):
            await asyncio.sleep(0)
        live = await manager.get_run(run.run_id)
        started = [s for s in live.steps if s.state != pb.STEP_STATE_PENDING]
        assert len(started) < 11, "steps went on starting while the store fell behind"
        store.held.set()
        events = [event async for event in manager.watch(run.run_id)]
        assert events[-1].HasField("run_completed")
        stored = await store.events(run.run_id, after_sequence=0)
        assert [e.sequence for e in stored] == list(range(1, len(stored) + 1))
        assert [e.WhichOneof("payload") for e in stored].count("step_completed") == 11
    finally:
        await manager.close()
        await store.close()


async def test_coordinate_raises_an_alert_while_the_store_fails_and_resolves_it(
    orchestrate: Orchestrate, data_dir: Path
) -> None:
    settings = Settings(
        data_dir=data_dir,
        orchestrate_target=orchestrate.server.target,
        execute_target=orchestrate.execute.target,
        monitor_interval_seconds=0.05,
    )
    coordinate = await start_tier("coordinate", settings)
    monitor = MonitorClient(coordinate.target)
    try:
        watched = monitor.watch_alerts()

        async def next_store_alert() -> monitor_pb.Alert:  # other alerts (memory, say) are not this test's
            async for alert in watched:
                if alert.kind == monitor_pb.ALERT_KIND_STORE_UNAVAILABLE:
                    return alert
            raise AssertionError("the alerts ended")

        orchestrate.store.failing = True
        await orchestrate.orchestrator.start_run(pb.StartRunRequest(workflow=workflow(step("a", value=1))))
        raised = await next_store_alert()
        assert raised.tier == common_pb2.TIER_ORCHESTRATE
        assert not raised.HasField("resolve_time")
        orchestrate.store.failing = False
        resolved = await next_store_alert()
        assert resolved.id == raised.id and resolved.HasField("resolve_time")
    finally:
        await monitor.close()
        await coordinate.stop()
