"""The contract every GoalStore backend keeps, as pytest tests that take a ``store`` fixture: idempotent
creation, events numbered by the store without gaps, transitions by the lifecycle table, fencing (a
write from an owner that lost the goal is refused, never dropped in silence), and the goal memory."""

from __future__ import annotations

import asyncio

import pytest

from tierstack.core.errors import ResourceExhaustedError
from tierstack.core.lifecycle import Fence, IllegalTransitionError, StaleOwnerError
from tierstack.server.coordinate.store import GoalStore
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as pb

__all__ = [
    "test_a_goal_whose_lease_passed_is_taken_over_and_its_owner_fenced_out",
    "test_a_request_id_holds_one_goal",
    "test_a_request_to_cancel_a_goal_waits_for_its_owner",
    "test_a_stale_owner_is_refused_and_the_new_owner_continues",
    "test_a_tenant_has_at_most_its_quota_of_unfinished_goals",
    "test_a_transition_stores_the_record_and_follows_the_table",
    "test_a_writer_that_believes_another_state_is_refused",
    "test_an_owner_takes_back_its_own_goals_it_no_longer_drives",
    "test_concurrent_take_overs_share_the_goals_out",
    "test_concurrent_writes_of_one_owner_get_distinct_numbers",
    "test_each_tenant_sees_its_own_goals_and_request_ids",
    "test_list_goals_pages_newest_first_and_filters_by_state",
    "test_the_goal_memory_keeps_the_newest_decomposition_of_each_goal",
    "test_the_store_numbers_events_without_gaps",
]


def new_goal(goal_id: str, *, request_id: str = "", created_ns: int = 1_000, tenant: str = "") -> pb.Goal:
    goal = pb.Goal(goal_id=goal_id, state=pb.GOAL_STATE_PENDING, request=pb.StartGoalRequest(request_id=request_id))
    goal.request.context.tenant_id = tenant
    goal.request.goal = f"goal {goal_id}"
    goal.create_time.FromNanoseconds(created_ns)
    return goal


def note(text: str) -> pb.GoalEvent:
    return pb.GoalEvent(goal_failed=pb.GoalFailed(error=common_pb2.ErrorDetail(message=text)))


async def test_a_request_id_holds_one_goal(store: GoalStore) -> None:
    first, fence = await store.create_goal(new_goal("g1", request_id="req"), "a")
    again, none = await store.create_goal(new_goal("g2", request_id="req"), "b")
    assert (first.goal_id, again.goal_id) == ("g1", "g1")
    assert fence == Fence("a", 1) and none is None
    assert await store.get_goal("g2") is None
    assert (await store.create_goal(new_goal("g3"), "a"))[0].goal_id == "g3"
    assert (await store.create_goal(new_goal("g4"), "a"))[0].goal_id == "g4"  # no request id: no conflict


async def test_a_tenant_has_at_most_its_quota_of_unfinished_goals(store: GoalStore) -> None:
    async def start(goal_id: str, tenant: str = "acme", request_id: str = "") -> pb.Goal | None:
        try:
            goal, _ = await store.create_goal(new_goal(goal_id, tenant=tenant, request_id=request_id), "o", most=2)
        except ResourceExhaustedError as error:
            assert error.reason == "TOO_MANY_GOALS" and error.retry_after
            return None
        return goal

    started = await asyncio.gather(*(start(f"g{index}", request_id=f"q{index}") for index in range(6)))
    accepted = [goal for goal in started if goal is not None]
    assert len(accepted) == 2
    assert (await start("again", request_id=accepted[0].request.request_id)) == accepted[0]
    assert await start("other", tenant="globex") is not None
    await store.write(accepted[0], Fence("o", 1), [], transition="cancel")
    assert await start("next") is not None and await start("more") is None


async def test_each_tenant_sees_its_own_goals_and_request_ids(store: GoalStore) -> None:
    acme, _ = await store.create_goal(new_goal("a1", request_id="req", created_ns=1_000, tenant="acme"), "o")
    globex, fence = await store.create_goal(new_goal("g1", request_id="req", created_ns=2_000, tenant="globex"), "o")
    assert (acme.goal_id, globex.goal_id, fence) == ("a1", "g1", Fence("o", 1))
    again, none = await store.create_goal(new_goal("a2", request_id="req", tenant="acme"), "o")
    assert (again.goal_id, none) == ("a1", None)
    assert await store.get_goal("a1", tenant="globex") is None
    found = await store.get_goal("a1", tenant="acme")
    assert found is not None and found.request.context.tenant_id == "acme"
    assert [g.goal_id for g in await store.list_goals(limit=10, after=None, state=0, tenant="globex")] == ["g1"]
    assert [g.goal_id for g in await store.list_goals(limit=10, after=None, state=0)] == ["g1", "a1"]


async def test_the_store_numbers_events_without_gaps(store: GoalStore) -> None:
    goal, fence = await store.create_goal(new_goal("g1"), "a")
    assert fence is not None
    written = await store.write(goal, fence, [note("one"), note("two")], transition="start")
    assert [e.sequence for e in written.events] == [1, 2]
    assert {e.goal_id for e in written.events} == {"g1"}
    assert (written.goal.state, written.goal.last_sequence) == (pb.GOAL_STATE_RUNNING, 2)
    again = await store.write(written.goal, fence, [note("three")])
    assert [e.sequence for e in again.events] == [3]
    assert [e.goal_failed.error.message for e in await store.events("g1", after_sequence=1)] == ["two", "three"]
    stored = await store.get_goal("g1")
    assert stored is not None and (stored.state, stored.last_sequence) == (pb.GOAL_STATE_RUNNING, 3)
    assert await store.events("missing", after_sequence=0) == []


async def test_concurrent_writes_of_one_owner_get_distinct_numbers(store: GoalStore) -> None:
    goal, fence = await store.create_goal(new_goal("g1"), "a")
    assert fence is not None
    await asyncio.gather(*(store.write(goal, fence, [note(str(n)), note(str(n))]) for n in range(20)))
    events = await store.events("g1", after_sequence=0)
    assert [e.sequence for e in events] == list(range(1, 41))
    # each write's events are adjacent: no write interleaved with another
    assert all(events[i].goal_failed == events[i + 1].goal_failed for i in range(0, 40, 2))


async def test_a_transition_stores_the_record_and_follows_the_table(store: GoalStore) -> None:
    goal, fence = await store.create_goal(new_goal("g1"), "a")
    assert fence is not None
    goal = (await store.write(goal, fence, [], transition="start")).goal
    goal.outputs["s1"].string_value = "done"
    done = await store.write(goal, fence, [pb.GoalEvent(goal_completed=pb.GoalCompleted())], transition="complete")
    assert done.goal.state == pb.GOAL_STATE_COMPLETED
    stored = await store.get_goal("g1")
    assert stored is not None and stored.outputs["s1"].string_value == "done"
    with pytest.raises(IllegalTransitionError) as caught:
        await store.write(done.goal, fence, [note("late")], transition="cancel")
    assert caught.value.reason == "ILLEGAL_TRANSITION" and "COMPLETED" in caught.value.message
    with pytest.raises(IllegalTransitionError):
        await store.claim("g1", "b")  # an ended goal has no owner to take over from
    assert [e.sequence for e in await store.events("g1", after_sequence=0)] == [1]


async def test_a_writer_that_believes_another_state_is_refused(store: GoalStore) -> None:
    goal, fence = await store.create_goal(new_goal("g1"), "a")
    assert fence is not None
    await store.write(goal, fence, [], transition="start")
    with pytest.raises(IllegalTransitionError):
        await store.write(goal, fence, [note("stale")])  # goal still says PENDING
    assert await store.events("g1", after_sequence=0) == []


async def test_a_stale_owner_is_refused_and_the_new_owner_continues(store: GoalStore) -> None:
    goal, old = await store.create_goal(new_goal("g1"), "a")
    assert old is not None
    goal = (await store.write(goal, old, [note("by a")], transition="start")).goal
    new = await store.claim("g1", "b")
    assert new == Fence("b", 2)
    with pytest.raises(StaleOwnerError) as caught:
        await store.write(goal, old, [note("a again")])
    assert caught.value.reason == "STALE_OWNER"
    with pytest.raises(StaleOwnerError):
        await store.write(goal, old, [pb.GoalEvent(goal_cancelled=pb.GoalCancelled())], transition="cancel")
    with pytest.raises(StaleOwnerError):
        await store.write(goal, Fence("a", 2), [note("same epoch, wrong owner")])
    written = await store.write(goal, new, [note("by b")])
    assert [e.sequence for e in written.events] == [2]
    messages = [e.goal_failed.error.message for e in await store.events("g1", after_sequence=0)]
    assert messages == ["by a", "by b"]
    stored = await store.get_goal("g1")
    assert stored is not None and stored.state == pb.GOAL_STATE_RUNNING
    assert await store.claim("g1", "a") == Fence("a", 3)  # a claim always raises the epoch


async def test_list_goals_pages_newest_first_and_filters_by_state(store: GoalStore) -> None:
    for index in range(5):
        goal, fence = await store.create_goal(new_goal(f"g{index}", created_ns=1_000 + index), "a")
        assert fence is not None
        if index % 2:
            await store.write(goal, fence, [], transition="cancel")
    first = await store.list_goals(limit=2, after=None, state=0)
    assert [g.goal_id for g in first] == ["g4", "g3"]
    last = first[-1]
    rest = await store.list_goals(limit=10, after=(last.create_time.ToNanoseconds(), last.goal_id), state=0)
    assert [g.goal_id for g in rest] == ["g2", "g1", "g0"]
    cancelled = await store.list_goals(limit=10, after=None, state=pb.GOAL_STATE_CANCELLED)
    assert [g.goal_id for g in cancelled] == ["g3", "g1"]
    taken = await store.take_over("starter", limit=None, at_start=True)
    # A shared store waits for the leases of the goals' owner; a store of one process knows it is gone.
    assert [goal.goal_id for goal, _ in taken] == ([] if store.shared else ["g0", "g2", "g4"])


async def test_a_goal_whose_lease_passed_is_taken_over_and_its_owner_fenced_out(store: GoalStore) -> None:
    store.lease_seconds = 0.5  # long enough that no lease passes between two statements
    goal, fence = await store.create_goal(new_goal("g1"), "first")
    assert fence is not None
    await store.create_goal(new_goal("g2", created_ns=2_000), "first")
    assert await store.renew("first", ["g1", "g2", "unknown"]) == {"g1", "g2"}
    assert await store.take_over("survivor", limit=None) == []
    await asyncio.sleep(0.7)
    # Its owner, late to renew, drives them still: it never takes the goals it drives from itself.
    assert await store.take_over("first", limit=None, driven=["g1", "g2"]) == []
    taken = await store.take_over("survivor", limit=None)
    assert [(g.goal_id, f) for g, f in taken] == [("g1", Fence("survivor", 2)), ("g2", Fence("survivor", 2))]
    assert await store.renew("first", ["g1", "g2"]) == set()
    with pytest.raises(StaleOwnerError):
        await store.write(goal, fence, [note("late")])
    assert await store.take_over("starter", limit=None, at_start=True) == (
        [] if store.shared else [(g, Fence("starter", 3)) for g, _ in taken]
    )


async def test_an_owner_takes_back_its_own_goals_it_no_longer_drives(store: GoalStore) -> None:
    store.lease_seconds = 0.1
    await store.create_goal(new_goal("g1"), "first")
    await asyncio.sleep(0.3)
    # Its lease passed and its owner does not drive it (its driver failed, say): it takes it back.
    [(goal, fence)] = await store.take_over("first", limit=None)
    assert (goal.goal_id, fence) == ("g1", Fence("first", 2))


async def test_concurrent_take_overs_share_the_goals_out(store: GoalStore) -> None:
    store.lease_seconds = 0.1
    for index in range(20):
        await store.create_goal(new_goal(f"g{index}", created_ns=1_000 + index), "gone")
    await asyncio.sleep(0.2)
    store.lease_seconds = 60  # taken over for long: no lease may pass while the others take theirs
    batches = await asyncio.gather(*(store.take_over(f"replica{n}", limit=None) for n in range(4)))
    assert sorted(goal.goal_id for batch in batches for goal, _ in batch) == sorted(f"g{i}" for i in range(20))


async def test_a_request_to_cancel_a_goal_waits_for_its_owner(store: GoalStore) -> None:
    await store.create_goal(new_goal("g1"), "owner")
    await store.request_cancel("unknown", "nothing to cancel")  # leaves nothing behind
    await store.request_cancel("g1", "not needed")
    assert await store.take_cancels("another") == []
    assert await store.take_cancels("owner") == [("g1", "not needed")]
    assert await store.take_cancels("owner") == []


async def test_the_goal_memory_keeps_the_newest_decomposition_of_each_goal(store: GoalStore) -> None:
    def plan(text: str) -> list[pb.Subtask]:
        return [pb.Subtask(id="s1", description=text, required_capabilities=["writing"])]

    long_goal = "write " + "the longest goal " * 4_000  # far past what a database index takes as a key
    for goal in ("a", "b", long_goal, "c"):
        await store.learn(goal, plan(f"plan {goal[:5]}"), keep=3)
    await store.learn("b", plan("plan b, again"), keep=3)  # replaces b's and makes it the newest
    learnt = await store.learnt(after=0, limit=10)
    assert [(entry.goal[:5], entry.subtasks[0].description) for entry in learnt] == [
        ("write", "plan write"),
        ("c", "plan c"),
        ("b", "plan b, again"),
    ]  # "a", learnt longest ago, is forgotten beyond the newest 3
    assert learnt[0].goal == long_goal and list(learnt[0].subtasks[0].required_capabilities) == ["writing"]
    positions = [entry.position for entry in learnt]
    assert positions == sorted(positions)
    assert await store.learnt(after=positions[0], limit=1) == learnt[1:2]  # paged from a position
    assert await store.learnt(after=positions[-1], limit=10) == []
    await asyncio.gather(*(store.learn(f"goal {n}", plan(f"plan {n}"), keep=100) for n in range(20)))
    together = await store.learnt(after=positions[-1], limit=100)
    assert sorted(entry.goal for entry in together) == sorted(f"goal {n}" for n in range(20))
    assert len({entry.position for entry in together}) == 20
