"""The contract every RunStore backend keeps, as pytest tests that take a ``store`` fixture: an open,
empty store of the backend under test (see the package's docstring)."""

from __future__ import annotations

import asyncio

import pytest

from tierstack.core.errors import ResourceExhaustedError
from tierstack.core.lifecycle import Fence, IllegalTransitionError, StaleOwnerError
from tierstack.core.values import now_timestamp
from tierstack.server.orchestrate.store import RunStore, StoredRun
from tierstack.v1 import common_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb

__all__ = [
    "test_a_claim_moves_the_run_on_and_fences_out_the_previous_owner",
    "test_a_record_must_follow_the_lifecycle",
    "test_a_request_id_holds_one_run",
    "test_a_request_to_stop_a_run_waits_for_its_owner",
    "test_a_run_whose_lease_passed_is_taken_over_and_its_owner_fenced_out",
    "test_a_stale_write_leaves_the_whole_batch_unwritten",
    "test_a_starting_owner_takes_over_the_runs_no_live_owner_holds",
    "test_a_tenant_has_at_most_its_quota_of_unfinished_runs",
    "test_an_owner_takes_back_its_own_runs_it_no_longer_drives",
    "test_concurrent_claims_of_a_paused_run_have_one_winner",
    "test_concurrent_take_overs_share_the_runs_out",
    "test_each_tenant_sees_its_own_runs_and_request_ids",
    "test_finished_runs_are_found_by_end_time_and_deleted_with_their_events",
    "test_list_runs_pages_newest_first_and_filters_by_state",
    "test_write_replaces_state_and_appends_events",
]


def new_run(
    run_id: str, *, request_id: str = "", created_ns: int = 0, state: int = pb.RUN_STATE_PENDING, tenant: str = ""
) -> StoredRun:
    """Returns a new run of a one-step workflow."""
    run = pb.Run(run_id=run_id, request_id=request_id, state=state, tenant_id=tenant)  # type: ignore[arg-type]
    run.create_time.FromNanoseconds(created_ns or now_timestamp().ToNanoseconds())
    step = pb.WorkflowStep(id="a", tool="core.echo")
    return StoredRun(run, pb.Workflow(name="test", steps=[step]), common_pb2.ResourceLimits(max_parallelism=3))


def event(run_id: str, sequence: int) -> pb.RunEvent:
    """Returns an event of a run."""
    return pb.RunEvent(run_id=run_id, sequence=sequence, run_started=pb.RunStarted(workflow_name=f"w{sequence}"))


OWNER = "test"


async def created(store: RunStore, stored: StoredRun) -> Fence:
    """Creates a run and returns its fence."""
    _, fence = await store.create_run(stored, OWNER)
    assert fence == Fence(OWNER, 1)
    return fence


async def test_a_request_id_holds_one_run(store: RunStore) -> None:
    first, fence = await store.create_run(new_run("r1", request_id="req"), OWNER)
    again, none = await store.create_run(new_run("r2", request_id="req"), "another")
    assert first.run_id == again.run_id == "r1"
    assert (fence, none) == (Fence(OWNER, 1), None)
    assert await store.get_run("r2") is None
    assert (await store.create_run(new_run("r3"), OWNER))[0].run_id == "r3"
    assert (await store.create_run(new_run("r4"), OWNER))[0].run_id == "r4"


async def test_a_tenant_has_at_most_its_quota_of_unfinished_runs(store: RunStore) -> None:
    async def start(run_id: str, tenant: str = "acme", request_id: str = "") -> str:
        try:
            stored = new_run(run_id, tenant=tenant, request_id=request_id, state=pb.RUN_STATE_RUNNING)
            run, _ = await store.create_run(stored, OWNER, most=3)
        except ResourceExhaustedError as error:
            assert error.reason == "TOO_MANY_RUNS" and error.retry_after
            return "refused"
        return run.run_id

    started = await asyncio.gather(*(start(f"r{index}", request_id=f"q{index}") for index in range(8)))
    assert sorted(started).count("refused") == 5  # at once, and still no more than 3
    accepted = [run_id for run_id in started if run_id != "refused"]
    assert await start("again", request_id=f"q{accepted[0][1:]}") == accepted[0]  # a retry is not new work
    assert await start("other", tenant="globex") == "other"
    fence = Fence(OWNER, 1)
    for run_id, state in ((accepted[0], pb.RUN_STATE_CANCELLED), (accepted[1], pb.RUN_STATE_PAUSED)):
        await store.write([pb.Run(run_id=run_id, state=state, tenant_id="acme")], [], {run_id: fence})
    assert await start("next") == "next"  # a finished run frees its place, a paused one keeps it
    assert await start("more") == "refused"
    assert (await store.create_run(new_run("unlimited", tenant="acme"), OWNER))[0].run_id == "unlimited"


async def test_each_tenant_sees_its_own_runs_and_request_ids(store: RunStore) -> None:
    acme, _ = await store.create_run(new_run("a1", request_id="req", created_ns=1_000, tenant="acme"), OWNER)
    globex, fence = await store.create_run(new_run("g1", request_id="req", created_ns=2_000, tenant="globex"), OWNER)
    assert (acme.run_id, globex.run_id, fence) == ("a1", "g1", Fence(OWNER, 1))  # one request id, two tenants
    again, none = await store.create_run(new_run("a2", request_id="req", tenant="acme"), OWNER)
    assert (again.run_id, none) == ("a1", None)
    # A tenant name that is another's with an id's start is still another tenant.
    tricky, _ = await store.create_run(new_run("t1", request_id="q", tenant="acme:1"), OWNER)
    assert tricky.run_id == "t1"
    assert await store.get_run("a1", tenant="globex") is None
    assert await store.get_stored("a1", tenant="globex") is None
    found = await store.get_run("a1", tenant="acme")
    assert found is not None and found.tenant_id == "acme"
    assert [r.run_id for r in await store.list_runs(limit=10, after=None, state=0, tenant="globex")] == ["g1"]
    assert {r.run_id for r in await store.list_runs(limit=10, after=None, state=0)} == {"a1", "g1", "t1"}


async def test_write_replaces_state_and_appends_events(store: RunStore) -> None:
    fences = {"r1": await created(store, new_run("r1"))}
    run = pb.Run(run_id="r1", state=pb.RUN_STATE_RUNNING, last_sequence=2)
    batch = [event("r1", 1), event("r1", 2)]
    await store.write([run], batch, fences)
    await store.write([], [event("r1", 3)], fences)
    stored = await store.get_stored("r1")
    assert stored is not None
    assert stored.run.state == pb.RUN_STATE_RUNNING
    assert stored.limits.max_parallelism == 3
    assert [s.id for s in stored.workflow.steps] == ["a"]
    assert [e.sequence for e in await store.events("r1", after_sequence=0)] == [1, 2, 3]
    assert [e.run_started.workflow_name for e in await store.events("r1", after_sequence=1)] == ["w2", "w3"]
    assert await store.events("missing", after_sequence=0) == []
    assert [e.sequence for e in await store.events("r1", after_sequence=0, limit=2)] == [1, 2]


async def test_list_runs_pages_newest_first_and_filters_by_state(store: RunStore) -> None:
    for index in range(5):
        state = pb.RUN_STATE_COMPLETED if index % 2 else pb.RUN_STATE_RUNNING
        await created(store, new_run(f"r{index}", created_ns=1_000 + index, state=state))
    first = await store.list_runs(limit=2, after=None, state=0)
    assert [r.run_id for r in first] == ["r4", "r3"]
    last = first[-1]
    rest = await store.list_runs(limit=10, after=(last.create_time.ToNanoseconds(), last.run_id), state=0)
    assert [r.run_id for r in rest] == ["r2", "r1", "r0"]
    completed = await store.list_runs(limit=10, after=None, state=pb.RUN_STATE_COMPLETED)
    assert [r.run_id for r in completed] == ["r3", "r1"]


async def test_a_starting_owner_takes_over_the_runs_no_live_owner_holds(store: RunStore) -> None:
    states = [pb.RUN_STATE_RUNNING, pb.RUN_STATE_PAUSED, pb.RUN_STATE_PENDING, pb.RUN_STATE_FAILED]
    for index, state in enumerate(states):
        await store.create_run(new_run(f"r{index}", created_ns=1_000 + index, state=state), "earlier")
    await store.create_run(new_run("mine", created_ns=2_000, state=pb.RUN_STATE_RUNNING), "starter")
    taken = await store.take_over("starter", limit=None, at_start=True)
    # A shared store waits for the earlier owner's lease; a store of one process knows it is gone.
    expected = ["mine"] if store.shared else ["r0", "r2", "mine"]
    assert [stored.run.run_id for stored, _ in taken] == expected
    assert all(fence == Fence("starter", 2) for _, fence in taken)
    assert await store.take_over("another", limit=None) == []  # every lease is alive


async def test_a_run_whose_lease_passed_is_taken_over_and_its_owner_fenced_out(store: RunStore) -> None:
    store.lease_seconds = 0.5  # long enough that no lease passes between two statements
    first = await created(store, new_run("r1", state=pb.RUN_STATE_RUNNING))
    await created(store, new_run("r2", state=pb.RUN_STATE_RUNNING))
    assert await store.renew(OWNER, ["r1", "r2", "unknown"]) == {"r1", "r2"}
    assert await store.take_over("survivor", limit=None) == []
    await asyncio.sleep(0.7)
    # Its owner, late to renew, drives them still: it never takes the runs it drives from itself.
    assert await store.take_over(OWNER, limit=None, driven=["r1", "r2"]) == []
    assert len(await store.take_over("survivor", limit=1)) == 1  # oldest first, at most the limit
    [(stored, fence)] = await store.take_over("survivor", limit=10)
    assert (stored.run.run_id, fence) == ("r2", Fence("survivor", 2))
    assert await store.renew(OWNER, ["r1", "r2"]) == set()  # its owner learns it holds nothing now
    assert await store.renew("survivor", ["r1", "r2"]) == {"r1", "r2"}
    await store.write([pb.Run(run_id="r1", state=pb.RUN_STATE_COMPLETED)], [], {"r1": Fence("survivor", 2)})
    assert await store.renew("survivor", ["r1"]) == {"r1"}  # held still, finished: its owner may tell
    await asyncio.sleep(0.7)
    taken = await store.take_over("third", limit=None)  # r2's lease passed too; r1, finished, is never taken
    assert [stored.run.run_id for stored, _ in taken] == ["r2"]
    with pytest.raises(StaleOwnerError):
        await store.write([], [event("r1", 1)], {"r1": first})


async def test_an_owner_takes_back_its_own_runs_it_no_longer_drives(store: RunStore) -> None:
    store.lease_seconds = 0.1
    await created(store, new_run("r1", state=pb.RUN_STATE_RUNNING))
    await asyncio.sleep(0.3)
    # Its lease passed and its owner does not drive it (its driver failed, say): it takes it back.
    [(stored, fence)] = await store.take_over(OWNER, limit=None)
    assert (stored.run.run_id, fence) == ("r1", Fence(OWNER, 2))


async def test_concurrent_take_overs_share_the_runs_out(store: RunStore) -> None:
    store.lease_seconds = 0.1
    for index in range(20):
        await created(store, new_run(f"r{index}", created_ns=1_000 + index, state=pb.RUN_STATE_RUNNING))
    await asyncio.sleep(0.2)
    store.lease_seconds = 60  # taken over for long: no lease may pass while the others take theirs
    batches = await asyncio.gather(*(store.take_over(f"replica{n}", limit=None) for n in range(4)))
    taken = [stored.run.run_id for batch in batches for stored, _ in batch]
    assert sorted(taken) == sorted(f"r{index}" for index in range(20))  # each exactly once


async def test_a_request_to_stop_a_run_waits_for_its_owner(store: RunStore) -> None:
    await created(store, new_run("r1", state=pb.RUN_STATE_RUNNING))
    await store.request_control("r1", "pause", "first")
    await store.request_control("r1", "cancel", "changed my mind")  # replaces the first
    assert await store.take_controls("another") == []
    assert await store.take_controls(OWNER) == [("r1", "cancel", "changed my mind")]
    assert await store.take_controls(OWNER) == []


def ended(run_id: str, state: int, end_ns: int | None) -> pb.Run:
    run = pb.Run(run_id=run_id, state=state)  # type: ignore[arg-type]
    if end_ns is not None:
        run.end_time.FromNanoseconds(end_ns)
    return run


async def test_finished_runs_are_found_by_end_time_and_deleted_with_their_events(store: RunStore) -> None:
    fences = {}
    for index in range(6):
        stored = new_run(f"r{index}", request_id=f"req{index}", created_ns=500 + index, state=pb.RUN_STATE_RUNNING)
        fences[f"r{index}"] = await created(store, stored)
    await store.write(
        [
            ended("r0", pb.RUN_STATE_COMPLETED, 3_000),
            ended("r1", pb.RUN_STATE_FAILED, 1_000),
            ended("r2", pb.RUN_STATE_CANCELLED, 2_000),
            ended("r3", pb.RUN_STATE_RUNNING, None),
            ended("r4", pb.RUN_STATE_PAUSED, None),
            ended("r5", pb.RUN_STATE_FAILED, None),  # no end time kept: its creation counts
        ],
        [event("r1", 1), event("r1", 2), event("r0", 1)],
        fences,
    )
    assert await store.finished_before(2_500, limit=10) == ["r5", "r1", "r2"]
    assert await store.finished_before(2_500, limit=2) == ["r5", "r1"]
    assert await store.finished_before(10_000, limit=10) == ["r5", "r1", "r2", "r0"]
    await store.delete_runs(["r1", "r5", "missing"])
    assert await store.get_run("r1") is None and await store.events("r1", after_sequence=0) == []
    assert [e.sequence for e in await store.events("r0", after_sequence=0)] == [1]
    assert [r.run_id for r in await store.list_runs(limit=10, after=None, state=0)] == ["r4", "r3", "r2", "r0"]
    # The request id of a deleted run is free again.
    assert (await store.create_run(new_run("r6", request_id="req1"), OWNER))[0].run_id == "r6"
    assert (await store.create_run(new_run("r7", request_id="req0"), OWNER))[0].run_id == "r0"


async def test_a_claim_moves_the_run_on_and_fences_out_the_previous_owner(store: RunStore) -> None:
    first = await created(store, new_run("r1", state=pb.RUN_STATE_RUNNING))
    await store.write([pb.Run(run_id="r1", state=pb.RUN_STATE_PAUSED)], [event("r1", 1)], {"r1": first})
    stored, second = await store.claim("r1", "resumer", "resume")
    assert (stored.run.state, second) == (pb.RUN_STATE_RUNNING, Fence("resumer", 2))
    assert (await store.get_run("r1")).state == pb.RUN_STATE_RUNNING  # type: ignore[union-attr]
    with pytest.raises(StaleOwnerError) as stale:  # the first owner's events are refused, not dropped
        await store.write([], [event("r1", 2)], {"r1": first})
    assert stale.value.metadata["run_id"] == "r1"
    with pytest.raises(IllegalTransitionError):  # it is running: a second resume cannot happen
        await store.claim("r1", "another", "resume")
    await store.write([], [event("r1", 2)], {"r1": second})
    assert [e.sequence for e in await store.events("r1", after_sequence=0)] == [1, 2]


async def test_a_stale_write_leaves_the_whole_batch_unwritten(store: RunStore) -> None:
    fences = {"a": await created(store, new_run("a", state=pb.RUN_STATE_RUNNING))}
    fences["b"] = await created(store, new_run("b", state=pb.RUN_STATE_RUNNING))
    await store.claim("b", "thief", "claim")
    with pytest.raises(StaleOwnerError):
        await store.write([pb.Run(run_id="a", state=pb.RUN_STATE_COMPLETED)], [event("a", 1), event("b", 1)], fences)
    assert (await store.get_run("a")).state == pb.RUN_STATE_RUNNING  # type: ignore[union-attr]
    assert await store.events("a", after_sequence=0) == [] and await store.events("b", after_sequence=0) == []


async def test_a_record_must_follow_the_lifecycle(store: RunStore) -> None:
    fences = {"r1": await created(store, new_run("r1", state=pb.RUN_STATE_RUNNING))}
    await store.write([pb.Run(run_id="r1", state=pb.RUN_STATE_COMPLETED)], [], fences)
    with pytest.raises(IllegalTransitionError):  # a completed run never changes again
        await store.write([pb.Run(run_id="r1", state=pb.RUN_STATE_RUNNING)], [], fences)
    with pytest.raises(IllegalTransitionError):
        await store.claim("r1", "another", "claim")


async def test_concurrent_claims_of_a_paused_run_have_one_winner(store: RunStore) -> None:
    fence = await created(store, new_run("r1", state=pb.RUN_STATE_RUNNING))
    await store.write([pb.Run(run_id="r1", state=pb.RUN_STATE_PAUSED)], [], {"r1": fence})
    outcomes = await asyncio.gather(
        *(store.claim("r1", f"owner{index}", "resume") for index in range(8)), return_exceptions=True
    )
    winners = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(outcome, IllegalTransitionError) for outcome in outcomes if outcome not in winners)
