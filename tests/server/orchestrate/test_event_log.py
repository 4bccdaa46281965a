"""The write-behind event log: a batch as soon as the writer is free, with all that waits; nothing
seen before it is stored; a failing store retried with backoff; room for new work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FlakyStore, wait_for
from tierstack.core.lifecycle import Fence
from tierstack.server.conformance.runs import event, new_run
from tierstack.server.orchestrate import EventLog, SqliteRunStore
from tierstack.v1 import orchestrator_service_pb2 as pb

OWNER = "test"
FENCE = Fence(OWNER, 1)


def record(log: EventLog, run: pb.Run, event: pb.RunEvent, on_written: Any, **options: Any) -> asyncio.Future[None]:
    """Records an event of a run the test created (and so owns, at epoch 1)."""
    return log.record(run, event, on_written, fence=FENCE, **options)


@pytest.fixture
async def flaky(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    store = FlakyStore(SqliteRunStore(tmp_path / "runs.sqlite3"))
    await store.open()
    await store.create_run(new_run("r1", state=pb.RUN_STATE_RUNNING), OWNER)
    yield store
    await store.close()


async def test_a_failing_store_is_retried_with_backoff_then_gets_every_event_once(
    flaky: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    reports: list[bool] = []

    async def report(serving: bool) -> None:
        reports.append(serving)

    log = EventLog(flaky, retry=(0.001, 0.004))
    log.report_health(report)
    seen: list[int] = []
    run = pb.Run(run_id="r1", state=pb.RUN_STATE_RUNNING)
    flaky.failing = True
    try:
        with caplog.at_level(logging.DEBUG, logger="tierstack.server.orchestrate.persistence"):
            written = [
                record(log, run, event("r1", n), lambda events: seen.extend(e.sequence for e in events))
                for n in (1, 2, 3)
            ]
            await wait_for(lambda: flaky.failures >= 20)
            assert log.failing and reports == [False] and log.stats.failures >= 20
            assert seen == [] and not any(future.done() for future in written)
            record(log, run, event("r1", 4), lambda events: seen.extend(e.sequence for e in events))
            flaky.failing = False
            await asyncio.gather(*written)
            await wait_for(lambda: seen == [1, 2, 3, 4])
        assert not log.failing and reports == [False, True] and log.queued == 0
        assert [e.sequence for e in await flaky.events("r1", after_sequence=0)] == [1, 2, 3, 4]
        # Told once when the store failed (its kind, no traceback) and once when it came back.
        told = [(r.levelname, r.exc_info) for r in caplog.records if r.levelno >= logging.INFO]
        assert told == [("WARNING", None), ("INFO", None)]
        assert "OperationalError" in caplog.records[0].getMessage()
    finally:
        await log.close()


async def test_new_work_waits_for_room_while_the_store_falls_behind(flaky: FlakyStore) -> None:
    log = EventLog(flaky, max_queued=2)
    run = pb.Run(run_id="r1")
    flaky.held.clear()
    try:
        await log.room()  # room at once while little waits
        record(log, run, event("r1", 1), lambda events: None)
        record(log, run, event("r1", 2), lambda events: None)
        waiting = asyncio.create_task(log.room())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done() and log.queued == 2
        flaky.held.set()
        await waiting
        assert [e.sequence for e in await flaky.events("r1", after_sequence=0)] == [1, 2]
    finally:
        await log.close()


async def test_close_gives_up_on_a_store_that_still_fails(flaky: FlakyStore, caplog: pytest.LogCaptureFixture) -> None:
    log = EventLog(flaky, retry=(0.001, 0.004))
    flaky.failing = True
    written = record(log, pb.Run(run_id="r1"), event("r1", 1), lambda events: None)
    await wait_for(lambda: flaky.failures >= 1)
    await log.close()  # ends, though nothing could be stored
    assert written.cancelled()
    assert any(r.levelname == "ERROR" and "could not be stored" in r.getMessage() for r in caplog.records)


async def test_a_batch_goes_as_soon_as_the_writer_is_free_with_all_that_waits_and_is_seen_once_stored(
    flaky: FlakyStore,
) -> None:
    log = EventLog(flaky)
    seen: list[int] = []
    run = pb.Run(run_id="r1", state=pb.RUN_STATE_RUNNING)
    flaky.held.clear()  # the store takes its time with the first write
    try:
        for sequence in (1, 2, 3):
            record(log, run, event("r1", sequence), lambda events: seen.extend(e.sequence for e in events))
        for _ in range(20):  # turns of the event loop, no timer
            await asyncio.sleep(0)
        assert seen == [] and await flaky.events("r1", after_sequence=0) == []  # nothing seen before it is stored
        run.state = pb.RUN_STATE_COMPLETED
        written = record(
            log, run, event("r1", 4), lambda events: seen.extend(e.sequence for e in events), with_run=True
        )
        flaky.held.set()
        await written
        assert seen == [1, 2, 3, 4]
        assert [e.sequence for e in await flaky.events("r1", after_sequence=0)] == [1, 2, 3, 4]
        stored = await flaky.get_run("r1")
        assert stored is not None and stored.state == pb.RUN_STATE_COMPLETED
        # The first event went at once, alone; the three recorded meanwhile went together after it.
        assert (log.stats.latency.count, log.stats.events, log.stats.largest_batch) == (2, 4, 3)
    finally:
        await log.close()


async def test_close_writes_what_is_queued(flaky: FlakyStore) -> None:
    log = EventLog(flaky)
    flaky.held.clear()
    record(log, pb.Run(run_id="r1"), event("r1", 1), lambda events: None)
    record(log, pb.Run(run_id="r1"), event("r1", 2), lambda events: None)  # waits behind the first
    asyncio.get_running_loop().call_soon(flaky.held.set)
    await log.close()
    assert [e.sequence for e in await flaky.events("r1", after_sequence=0)] == [1, 2]
