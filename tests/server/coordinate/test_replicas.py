"""Two Coordinate replicas on one PostgreSQL database: a goal pursued by one is watched and cancelled
through the other, and found through either."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

from tests.helpers import HttpServer, start_tier, wait_for
from tests.server.coordinate.test_goals import AGENTS
from tierstack.client import CoordinatorClient
from tierstack.server import Settings
from tierstack.v1 import coordinator_service_pb2 as pb
from tools.postgres import LocalPostgres


async def test_a_goal_is_watched_and_cancelled_through_the_replica_that_does_not_pursue_it(
    postgres_server: LocalPostgres, tmp_path: Path, http_server: HttpServer, held: threading.Event
) -> None:
    settings = Settings(data_dir=tmp_path, store_url=postgres_server.new_database(), lease_seconds=1.0)
    execute = await start_tier("execute", settings)
    orchestrate = await start_tier("orchestrate", dataclasses.replace(settings, execute_target=execute.target))
    wired = dataclasses.replace(settings, orchestrate_target=orchestrate.target, execute_target=execute.target)
    pursuer = await start_tier("coordinate", dataclasses.replace(wired, data_dir=tmp_path / "c1"))
    other = await start_tier("coordinate", dataclasses.replace(wired, data_dir=tmp_path / "c2"))
    try:
        async with CoordinatorClient(pursuer.target) as first, CoordinatorClient(other.target) as second:
            request = pb.StartGoalRequest(goal=f"fetch {http_server.url}/hold then write it up", agents=AGENTS)
            goal_id = (await first.start_goal(request)).goal.goal_id
            seen: list[pb.GoalEvent] = []

            async def watch() -> None:
                async for event in second.watch_goal(goal_id):
                    seen.append(event)

            watcher = asyncio.create_task(watch())
            await wait_for(lambda: any(e.HasField("subtask_started") for e in seen))  # live, through the store
            cancelled = await second.cancel_goal(goal_id, reason="changed my mind")
            assert cancelled.state == pb.GOAL_STATE_CANCELLED
            await watcher
            assert seen[-1].goal_cancelled.reason == "changed my mind"
            assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
            assert (await first.get_goal(goal_id)).state == pb.GOAL_STATE_CANCELLED
            listed = (await second.list_goals()).goals
            assert [goal.goal_id for goal in listed] == [goal_id]
    finally:
        for server in (other, pursuer, orchestrate, execute):
            await server.stop()
