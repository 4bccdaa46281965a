"""The contract every ExecutionStore backend keeps, as pytest tests that take a ``store`` fixture."""

from __future__ import annotations

import asyncio
import time

from tierstack.server.execute.store import Approval, ExecutionStore, stop_key
from tierstack.v1 import executor_service_pb2 as pb

__all__ = [
    "test_a_finished_execution_is_kept_once",
    "test_an_approval_is_opened_once_per_call_and_answered_once",
    "test_an_execution_asked_to_stop_counts_the_requests_until_it_finishes",
    "test_an_execution_runs_on_one_replica_at_a_time",
    "test_old_executions_and_expired_approvals_are_forgotten",
]


def finished_events(execution_id: str, output: str) -> list[pb.ExecutionEvent]:
    return [
        pb.ExecutionEvent(sequence=1, execution_id=execution_id, started=pb.ExecutionStarted(step_id="a")),
        pb.ExecutionEvent(sequence=2, execution_id=execution_id, output=pb.ExecutionOutput()),
        pb.ExecutionEvent(sequence=3, execution_id=execution_id, completed=pb.ExecutionCompleted()),
    ][: 3 if output else 1]


def approval(approval_id: str, index: int = 0, *, expire_ns: int = 0) -> Approval:
    return Approval(
        approval_id=approval_id,
        execution_id="run/a/1",
        index=index,
        tool="files.write",
        arguments=b"\x0a\x00",
        expire_ns=expire_ns or time.time_ns() + 60 * 10**9,
    )


async def test_a_finished_execution_is_kept_once(store: ExecutionStore) -> None:
    assert await store.finished("e1") is None
    await store.finish("e1", finished_events("e1", "first"))
    await store.finish("e1", finished_events("e1", ""))  # a second finish under the same id changes nothing
    kept = await store.finished("e1")
    assert kept is not None
    assert [e.WhichOneof("payload") for e in kept] == ["started", "output", "completed"]
    assert kept[0].execution_id == "e1"


async def test_an_approval_is_opened_once_per_call_and_answered_once(store: ExecutionStore) -> None:
    first = await store.open_approval(approval("p1"))
    again = await store.open_approval(approval("p2"))  # the same call, asked again after a restart
    assert again.approval_id == first.approval_id == "p1"
    assert (await store.open_approval(approval("p3", index=1))).approval_id == "p3"
    heard = asyncio.create_task(store.wait_changed("p1", 30))
    await asyncio.sleep(0)  # the waiter is listening once its task has run to its first wait
    answered = await store.decide("p1", "not today")
    if store.shared:
        await asyncio.wait_for(heard, 10)  # the replica whose call waits hears the answer
    assert answered is not None and answered.decided and answered.rejection == "not today"
    assert await store.decide("p1", None) is None  # answered already
    assert await store.decide("missing", None) is None
    heard.cancel()
    approved = await store.decide("p3", None)
    assert approved is not None and approved.decided and approved.rejection == ""
    kept = await store.approval("p1")
    assert kept is not None and kept.arguments == b"\x0a\x00"


async def test_old_executions_and_expired_approvals_are_forgotten(store: ExecutionStore) -> None:
    await store.finish("old", finished_events("old", "x"))
    await store.open_approval(approval("gone", expire_ns=1))
    cut = time.time_ns()
    await store.finish("new", finished_events("new", "x"))
    assert await store.forget_before(cut) == 1
    assert await store.finished("old") is None and await store.finished("new") is not None
    assert await store.approval("gone") is None


async def test_an_execution_runs_on_one_replica_at_a_time(store: ExecutionStore) -> None:
    assert await store.begin("e1", "a")
    assert await store.begin("e1", "a")  # its runner asks again: still its own
    if not store.shared:
        return  # one process keeps its executions in flight itself
    assert not await store.begin("e1", "b")
    store.lease_seconds = 0.2
    await store.hold(["e1"], "a")
    await asyncio.sleep(0.3)
    assert await store.begin("e1", "b")  # a's lease passed: b runs it
    await store.finish("e1", finished_events("e1", "x"))
    assert not await store.begin("e1", "c")  # finished: replayed, never run again
    assert await store.begin("e2", "a")
    await store.release("e2", "a")
    assert await store.begin("e2", "b")  # given up: runs again elsewhere


async def test_an_execution_asked_to_stop_counts_the_requests_until_it_finishes(store: ExecutionStore) -> None:
    assert not await store.request_cancel("nobody-runs-it")
    assert await store.cancels("nobody-runs-it") == 0  # nothing recorded for an execution never claimed
    if not store.shared:
        return  # one process stops its executions itself
    assert await store.begin("e1", "a")
    heard = asyncio.create_task(store.wait_changed(stop_key("e1"), 30))
    await asyncio.sleep(0)  # the waiter is listening once its task has run to its first wait
    assert await store.request_cancel("e1")  # a replica runs it
    await asyncio.wait_for(heard, 10)  # its runner hears of it (unheard, it would wait 30 s)
    assert await store.request_cancel("e1")
    assert await store.cancels("e1") == 2
    await store.finish("e1", finished_events("e1", "x"))
    assert await store.cancels("e1") == 0  # finished: nothing left to stop
    assert await store.begin("e2", "a")
    await store.release("e2", "a")
    assert not await store.request_cancel("e2")  # given up: nobody runs it now
    assert await store.begin("e3", "a")
    assert await store.request_cancel("e3")
    await store.release("e3", "a")
    assert await store.begin("e3", "b")
    assert await store.cancels("e3") == 0  # claimed again: it starts afresh
