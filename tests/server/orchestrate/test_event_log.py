"""The write-behind event log: batches, urgent writes, and nothing seen before it is stored."""

from __future__ import annotations

import asyncio

from tests.server.orchestrate.workflows import event, new_run
from tierstack.server.orchestrate import EventLog, MemoryRunStore
from tierstack.v1 import orchestrator_service_pb2 as pb


async def test_events_are_batched_and_announced_only_once_stored() -> None:
    store = MemoryRunStore()
    await store.create_run(new_run("r1"))
    log = EventLog(store, interval=3600)  # only a critical record or close() writes here
    seen: list[int] = []
    run = pb.Run(run_id="r1", state=pb.RUN_STATE_RUNNING)
    try:
        for sequence in (1, 2, 3):
            log.record(run, event("r1", sequence), lambda events: seen.extend(e.sequence for e in events), urgent=False)
        await asyncio.sleep(0.01)
        assert seen == [] and await store.events("r1", after_sequence=0) == []
        run.state = pb.RUN_STATE_COMPLETED
        written = log.record(
            run, event("r1", 4), lambda events: seen.extend(e.sequence for e in events), urgent=True, with_run=True
        )
        await written
        assert seen == [1, 2, 3, 4]
        assert [e.sequence for e in await store.events("r1", after_sequence=0)] == [1, 2, 3, 4]
        stored = await store.get_run("r1")
        assert stored is not None and stored.state == pb.RUN_STATE_COMPLETED
        assert (log.stats.latency.count, log.stats.events, log.stats.largest_batch) == (1, 4, 4)
    finally:
        await log.close()


async def test_close_writes_what_is_queued() -> None:
    store = MemoryRunStore()
    await store.create_run(new_run("r1"))
    log = EventLog(store, interval=3600)
    log.record(pb.Run(run_id="r1"), event("r1", 1), lambda events: None, urgent=False)
    await log.close()
    assert [e.sequence for e in await store.events("r1", after_sequence=0)] == [1]
