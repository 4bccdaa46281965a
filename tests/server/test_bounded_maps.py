"""Maps keyed by what callers send keep their budgets, however many distinct keys arrive."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import FakeOpenAI, HttpServer, start_tier
from tests.server.orchestrate.workflows import step as step_of
from tests.server.orchestrate.workflows import workflow
from tierstack.client import ExecutorClient, MonitorClient
from tierstack.core.values import to_struct
from tierstack.core.workflow import check_workflow
from tierstack.server import Settings
from tierstack.server.ai.accounting import KEPT_NAMES
from tierstack.server.bounded import ENTRY_OVERHEAD, ByteBudgetLRU
from tierstack.server.execute.strategies import CONVERSATIONAL, KEPT_RECORDS, StrategySelector
from tierstack.server.orchestrate.planner import Planner
from tierstack.v1 import common_pb2, executor_service_pb2


def test_a_byte_budget_lru_keeps_its_budget_and_the_most_recent() -> None:
    kept: ByteBudgetLRU[int, bytes] = ByteBudgetLRU(10 * (100 + ENTRY_OVERHEAD), len)
    for key in range(1000):
        kept[key] = bytes(100)
        assert kept.currsize <= kept.maxsize
    assert sorted(kept) == list(range(990, 1000))
    kept[990]  # used: the next to go is 991
    kept[5000] = bytes(100)
    assert 990 in kept and 991 not in kept
    kept[990] = bytes(10 * 100 + 10 * ENTRY_OVERHEAD)  # larger than the whole budget: not kept
    assert 990 not in kept and kept.currsize <= kept.maxsize
    empty: ByteBudgetLRU[int, bytes] = ByteBudgetLRU(10 * ENTRY_OVERHEAD, len)
    for key in range(1000):  # values of no bytes still cost their entry
        empty[key] = b""
    assert len(empty) == 10


def test_strategy_track_records_are_bounded() -> None:
    selector = StrategySelector()
    for index in range(KEPT_RECORDS + 500):
        selector.record(f"step-{index}|prompt", CONVERSATIONAL).add(success=True)
    assert len(selector.records) == KEPT_RECORDS
    assert (f"step-{KEPT_RECORDS + 499}|prompt", CONVERSATIONAL) in selector.records


async def test_many_model_names_keep_breakers_latency_and_usage_bounded(
    data_dir: Path, http_server: HttpServer
) -> None:
    fake = FakeOpenAI(http_server)
    settings = Settings(data_dir=data_dir, model_base_url=fake.base_url, model="tiny")
    server = await start_tier("execute", settings)
    client, monitor = ExecutorClient(server.target), MonitorClient(server.target)
    names = KEPT_NAMES + 50
    try:
        for first in range(0, names, 100):
            calls = [
                common_pb2.ToolCall(tool="ai.complete", arguments=to_struct({"prompt": "hi", "model": f"m{index}"}))
                for index in range(first, min(first + 100, names))
            ]
            request = executor_service_pb2.ExecuteToolsRequest(
                calls=calls, max_concurrency=16, context=common_pb2.RequestContext(tenant_id=f"tenant-{first}")
            )
            results = [event.call_finished.result async for event in client.execute_tools(request)]
            assert all(not result.HasField("error") for result in results)
        [metrics] = (await monitor.get_metrics()).tiers
        model = metrics.execute.model
        assert model.requests == names
        assert len(model.breakers) == len(model.by_model) == KEPT_NAMES
        assert f"openai-compatible/m{names - 1}" in model.breakers and "openai-compatible/m0" not in model.breakers
        assert f"m{names - 1}" in model.by_model and "m0" not in model.by_model
    finally:
        await client.close()
        await monitor.close()
        await server.stop()


def test_plans_are_cached_within_a_byte_budget() -> None:
    planner = Planner(lambda step: 0.1, capacity_bytes=64 * 1024)
    specs = [
        check_workflow(workflow(*(step_of(f"w{index}-step-{n}") for n in range(20)), name=f"w{index}"))
        for index in range(200)
    ]
    for spec in specs:
        assert planner.plan(spec)[1] is False
    assert planner.plan(specs[-1])[1] is True  # the latest are kept
    assert planner.plan(specs[0])[1] is False  # the oldest went to keep the budget
