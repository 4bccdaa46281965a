"""The run manager: starts runs, schedules each step as soon as its dependencies finish, records
every event through the write-behind log, resumes runs after a restart, and lets callers watch,
pause, resume and cancel runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar

from cachetools import LRUCache
from google.protobuf import struct_pb2
from jmespath.exceptions import JMESPathError

from tierstack.core.budgets import describe_warning
from tierstack.core.errors import (
    ERROR_DOMAIN,
    PERMANENT_FAILURES,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TierstackError,
    UnavailableError,
    Violation,
    error_detail,
    error_detail_of_call,
    message_of,
    output_too_large,
)
from tierstack.core.lifecycle import Fence, IllegalTransitionError
from tierstack.core.templates import Budget, TemplateError, TooLargeError, render
from tierstack.core.tracing import span
from tierstack.core.values import (
    JSON,
    from_struct,
    from_value,
    now_timestamp,
    to_duration,
    to_seconds,
    to_struct,
    to_value,
)
from tierstack.core.workflow import (
    DEFAULT_MAX_DEPTH,
    StepSpec,
    WorkflowSpec,
    check_workflow,
    content_hash,
    unknown_tools,
)
from tierstack.server import boundary
from tierstack.server.auth.keys import Role
from tierstack.server.auth.principal import Principal, act_as, current, tenant_scope
from tierstack.server.bounded import ByteBudgetLRU
from tierstack.server.budget import BudgetWarnings, add_usage, share_of, spent_message, unreserved
from tierstack.server.config import Settings
from tierstack.server.feed import Feed
from tierstack.server.metrics import LatencyHistogram, RateMeter
from tierstack.server.orchestrate.context import RunContext
from tierstack.server.orchestrate.persistence import MAX_QUEUED, EventLog
from tierstack.server.orchestrate.planner import Planner
from tierstack.server.orchestrate.store import FINISHED, UNFINISHED, RunStore, StoredRun
from tierstack.server.retention import Sweeper
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb

_log = logging.getLogger(__name__)

#: How many steps of one run may execute at once unless its limits say otherwise.
DEFAULT_PARALLELISM = 16
#: The first and the longest wait before a step whose call to Execute was lost is asked for again.
TRANSPORT_BACKOFF = (0.05, 5.0)
#: The duration the planner assumes for a tool it has not seen run yet.
DEFAULT_STEP_ESTIMATE_SECONDS = 0.1
_TIER = common_pb2.TIER_ORCHESTRATE
_error = functools.partial(error_detail, _TIER)
_DEFAULTS = Settings()
#: How many bytes of checked workflows (counted in their wire form) are kept to be reused.
SPEC_CACHE_BYTES = 16 << 20
#: How many tools' recent step durations are kept for the planner's estimates.
KEPT_TOOL_ESTIMATES = 4096
#: The most bytes of step outputs one run holds (in memory while it runs, and in its stored record).
MAX_RUN_OUTPUTS_HELD = 64 << 20
#: How many stored events a watcher of a run not running here reads at once.
WATCH_PAGE = 64
# How long a watcher of a run another replica drives waits before it reads the store again, unless
# told of a change first.
_WATCH_WAIT = 0.5
#: The most runs one replica takes over at a time from replicas whose leases passed.
_TAKE_OVER_BATCH = 100
#: How many runs one round of the retention sweep deletes at once.
_DELETE_BATCH = 500
_T = TypeVar("_T")


def _is_large(workflow: pb.Workflow) -> bool:
    """Returns whether work that grows with the workflow belongs in a worker thread (measuring it
    costs about as much as parsing the request did)."""
    return workflow.ByteSize() > boundary.CHECK_INLINE_BYTES


async def _sized(large: bool, call: Callable[[], _T]) -> _T:
    """Returns ``call()``, run in a worker thread when the workflow it works on is large."""
    return await asyncio.to_thread(call) if large else call()


def _max_depth(limits: common_pb2.ResourceLimits | None) -> int:
    """Returns how deeply a run's workflows may nest."""
    return limits.max_depth if limits is not None and limits.max_depth > 0 else DEFAULT_MAX_DEPTH


class StepRunner(Protocol):
    """Runs steps in Tier 3 (the Execute client satisfies it, and so does the executor in process)."""

    def execute(
        self, request: executor_service_pb2.ExecuteRequest
    ) -> AsyncIterator[executor_service_pb2.ExecutionEvent]:
        """Runs one step and yields its events; a step with an execution id outlives its caller."""
        ...

    async def cancel_execution(self, execution_id: str) -> bool:
        """Stops a step in flight; returns whether it was."""
        ...


ToolCatalog = Callable[[], Awaitable[Collection[str]]]


class _LiveRun:
    """A run executing in this process: its state, its stored history and who waits for news."""

    def __init__(
        self,
        run: pb.Run,
        spec: WorkflowSpec,
        limits: common_pb2.ResourceLimits,
        parallelism: int,
        fence: Fence | None = None,
    ) -> None:
        self.run = run
        self.spec = spec
        self.limits = limits
        self.fence = fence  # None for a run only read here
        self.feed: Feed[pb.RunEvent] = Feed()  # its stored events; it ends when the run does
        self.stop: str | None = None  # "cancel", "pause" or "lost" (another owner took it), once asked
        self.stop_reason = ""
        self.task: asyncio.Task[None] | None = None
        self.steps = {step.step_id: step for step in run.steps}
        self.rerun: set[str] = set()  # in flight when the last process stopped: same attempt again
        self.parallelism = limits.max_parallelism or parallelism
        self.slots = asyncio.Semaphore(self.parallelism)
        self.usage = common_pb2.ResourceUsage()
        # The shares of the run's budget that its steps in flight at Tier 3 hold, by step path: with
        # what the run has used, never more than its limits.
        self.reserved: dict[str, common_pb2.ResourceLimits] = {}
        self.ready: set[str] = set()  # tool steps started that hold no share yet: each will ask for one
        self.freed = asyncio.Event()  # set (and replaced) whenever a step gives its share back
        self.warnings = BudgetWarnings(limits)
        self.output_bytes = sum(step.output.ByteSize() for step in run.steps)  # held by its completed steps
        self.context: RunContext

    def lost(self) -> None:
        """Stops driving the run at once: another owner has claimed it, and writes nothing more."""
        if self.task is not None and not self.feed.ended:
            self.stop, self.stop_reason = "lost", "another owner claimed the run"
            self.task.cancel()

    def output_of(self, path: str) -> struct_pb2.Value | None:
        state = self.steps.get(path)
        return state.output if state is not None and state.state == pb.STEP_STATE_COMPLETED else None


class RunManager:
    """Runs workflows against a step runner and keeps them in a store.

    Args:
        store: Where runs and events are kept; opened and closed by the caller.
        owner: Names this manager as the owner of the runs it drives; unique per process by default.
        max_held_bytes: The most bytes of step outputs one run holds; a step that would pass it fails
            with ``OUTPUT_TOO_LARGE``.
        tenant_runs: The most unfinished runs a tenant may start itself, with auth on; more are refused
            with ``TOO_MANY_RUNS``. 0 for no limit.
        runner: Executes steps (Tier 3).
        tools: Returns the names of the tools Tier 3 offers, for checking workflows; None skips it.
        parallelism: The default cap on steps of one run executing at once.
        max_output_bytes: The largest output of a step (in its wire form); a larger one fails the step
            with ``OUTPUT_TOO_LARGE``.
        max_total_output_bytes: The largest outputs of a run, together; larger ones fail the run with
            ``OUTPUT_TOO_LARGE``.
        max_message_bytes: The largest request a step may send to Tier 3; a larger one (its arguments
            rendered) fails the step with ``REQUEST_TOO_LARGE``.
        max_queued_events: New steps wait while this many events wait to be stored.
        retention: How long a finished run is kept after it ended, in seconds; 0 keeps it forever.
    """

    def __init__(
        self,
        store: RunStore,
        runner: StepRunner,
        *,
        tools: ToolCatalog | None = None,
        parallelism: int = DEFAULT_PARALLELISM,
        max_output_bytes: int = _DEFAULTS.max_output_bytes,
        max_total_output_bytes: int = _DEFAULTS.max_total_output_bytes,
        max_message_bytes: int = _DEFAULTS.max_message_bytes,
        max_queued_events: int = MAX_QUEUED,
        retention: float = 0.0,
        owner: str = "",
        max_held_bytes: int = MAX_RUN_OUTPUTS_HELD,
        tenant_runs: int = 0,
    ) -> None:
        self._max_held_bytes = max_held_bytes
        self._tenant_runs = tenant_runs
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._max_message_bytes = max_message_bytes
        self._store = store
        self._max_output_bytes = max_output_bytes
        self._max_total_output_bytes = max_total_output_bytes
        self._runner = runner
        self._tools = tools
        self._parallelism = parallelism
        self._live: dict[str, _LiveRun] = {}
        self._cancelling: set[asyncio.Task[None]] = set()  # steps in flight at Tier 3 being stopped
        self._tool_seconds: LRUCache[str, float] = LRUCache(KEPT_TOOL_ESTIMATES)
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None
        self.log = EventLog(store, max_queued=max_queued_events)
        self._retention = Sweeper("runs", retention, self._delete_finished)
        self.planner = Planner(self._estimate)
        self.step_latency = LatencyHistogram()
        self.context_operations = RateMeter()
        self.queued_steps = 0
        self.finished_runs: Counter[str] = Counter()
        self._specs: ByteBudgetLRU[tuple[str, int], tuple[WorkflowSpec, int]] = ByteBudgetLRU(
            SPEC_CACHE_BYTES, lambda kept: kept[1]
        )

    def _estimate(self, step: StepSpec) -> float:
        if step.workflow is not None:
            return self.planner.plan(step.workflow)[0].estimated_seconds
        return self._tool_seconds.get(step.tool, DEFAULT_STEP_ESTIMATE_SECONDS)

    def runs_by_state(self) -> Counter[str]:
        """Counts the runs executing in this process and those that finished since it started, by state."""
        counts = Counter(pb.RunState.Name(live.run.state) for live in self._live.values())
        counts.update(self.finished_runs)
        return counts

    @property
    def live_runs(self) -> int:
        """Counts the runs executing in this process."""
        return len(self._live)

    async def open(self) -> None:
        """Resumes the runs no live owner holds: every run an earlier process left pending or running
        on a store of one process, those whose owner's lease has passed on a shared one. A run that
        cannot be resumed (what was stored no longer passes the checks, or cannot be read) is failed
        with the reason RUN_NOT_RESUMABLE instead, so that nothing stored keeps the server from
        starting. Then keeps its runs' leases, takes over runs whose owner died, and deletes finished
        runs once their retention has passed."""
        for stored, fence in await self._store.take_over(self.owner, limit=None, at_start=True):
            await self._adopt(stored, fence)
        self._keeper = asyncio.create_task(self._keep(), name="run leases")
        self._retention.start()

    async def _adopt(self, stored: StoredRun, fence: Fence) -> None:
        """Drives a run this manager has just taken over from its last stored state."""
        history: list[pb.RunEvent] = []
        try:
            history = await self._store.events(stored.run.run_id, after_sequence=0)
            stored_request = pb.StartRunRequest(workflow=stored.workflow, limits=stored.limits)
            violations = await boundary.check_off_loop(stored_request)
            if violations:
                raise InvalidArgumentError(violations)
            await self._resume(stored, fence, history, "orchestrator restarted")
        except Exception as exc:
            self._live.pop(stored.run.run_id, None)
            _log.warning("run %s cannot be resumed; it is failed", stored.run.run_id, exc_info=exc)
            try:
                await self._fail_unresumable(stored, fence, history, exc)
            except Exception as failure:  # the store fails too: the next start tries again
                _log.error("run %s could not be marked failed (%s)", stored.run.run_id, type(failure).__name__)

    async def _keep(self) -> None:
        """Renews the leases of the runs driven here, stops driving those another owner took (and all
        of them once the store has refused renewals for most of a lease, before another replica may
        take them), passes on the requests to stop them made on other replicas, and takes over the
        runs whose owner's lease has passed; a third of a lease apart, or at once when a request
        arrives."""
        interval = self._store.lease_seconds / 3
        renewed = time.monotonic()
        waiting: list[tuple[str, str, str, float]] = []  # requests for runs not driven yet, and until when
        while True:
            await self._store.wait_changed(f"owner:{self.owner}", 0.25 if waiting else interval)
            driven = dict(self._live)
            try:
                held = await self._store.renew(self.owner, list(driven))
            except Exception as exc:
                if time.monotonic() - renewed > 2 * interval:
                    _log.warning("the run store cannot renew this server's leases (%s)", type(exc).__name__)
                    held = set()  # another replica may take them over at any moment: stop first
                else:
                    continue
            else:
                renewed = time.monotonic()
            for run_id, live in driven.items():  # runs claimed here since are other objects
                if run_id not in held and self._live.get(run_id) is live:
                    live.lost()
            try:
                # A request for a run claimed here but not yet driven (resuming: its history is being
                # read) waits for it up to a lease, instead of being lost.
                taken = [
                    (run_id, kind, reason, time.monotonic() + self._store.lease_seconds)
                    for run_id, kind, reason in await self._store.take_controls(self.owner)
                ]
                still: list[tuple[str, str, str, float]] = []
                for run_id, kind, reason, until in [*waiting, *taken]:
                    if (target := self._live.get(run_id)) is not None:
                        _ask_stop(target, kind, reason)
                    elif until > time.monotonic():
                        still.append((run_id, kind, reason, until))
                waiting = still
                for stored, fence in await self._store.take_over(
                    self.owner, limit=_TAKE_OVER_BATCH, driven=self._live.keys()
                ):
                    _log.info("run %s taken over: its owner's lease had passed", stored.run.run_id)
                    await self._adopt(stored, fence)
            except Exception as exc:
                _log.warning("the run store cannot pass on requests or take over runs (%s)", type(exc).__name__)

    async def _fail_unresumable(
        self, stored: StoredRun, fence: Fence, history: list[pb.RunEvent], cause: Exception
    ) -> None:
        run = stored.run
        if isinstance(cause, InvalidArgumentError):
            first = cause.violations[0]
            why = f"what was stored no longer passes the checks ({first.field}: {first.description})"
        else:
            why = "what was stored cannot be read back"
        run.state = pb.RUN_STATE_FAILED
        run.error.CopyFrom(_error("RUN_NOT_RESUMABLE", f"the run cannot be resumed: {why}"))
        run.end_time.CopyFrom(now_timestamp())
        run.last_sequence = max(run.last_sequence, history[-1].sequence if history else 0) + 1
        event = pb.RunEvent(
            sequence=run.last_sequence,
            run_id=run.run_id,
            correlation_id=run.correlation_id,
            time=run.end_time,
            run_failed=pb.RunFailed(error=run.error),
        )
        await self._store.write([run], [event], {run.run_id: fence})
        self.finished_runs[pb.RunState.Name(run.state)] += 1

    def stopping(self) -> None:
        """Marks the process as stopping: runs are no longer cancelled when their callers go away
        (the server going away is why); they stay unfinished, to resume on the next start."""
        self._closing = True

    async def close(self) -> None:
        """Stops every run task (their runs stay unfinished, to resume on the next start) and writes
        what the log holds."""
        self._closing = True
        await self._retention.close()
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._cancelling, return_exceptions=True)
        await self.log.close()

    async def check(self, workflow: pb.Workflow, limits: common_pb2.ResourceLimits | None = None) -> WorkflowSpec:
        """Checks a workflow, including its tools against Tier 3's.

        Raises:
            InvalidArgumentError: Every problem found, each naming its field.
            TierstackError: Tier 3 could not be asked for its tools.
        """
        tools = await self._tools() if self._tools is not None else None
        large = _is_large(workflow)
        unknown = await _sized(large, functools.partial(unknown_tools, workflow, tools)) if tools is not None else []
        try:
            spec = await self._spec(workflow, _max_depth(limits), large)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError([*exc.violations, *unknown], reason=exc.reason) from None
        if unknown:
            raise InvalidArgumentError(unknown, reason="INVALID_WORKFLOW")
        return spec

    async def spec(self, workflow: pb.Workflow, max_depth: int = DEFAULT_MAX_DEPTH) -> WorkflowSpec:
        """Returns the checked form of a workflow; an identical workflow is checked only once (an LRU
        of :data:`SPEC_CACHE_BYTES`). A large workflow is hashed and checked in a worker thread, so
        the loop keeps serving.

        Raises:
            InvalidArgumentError: Every problem found, each naming its field.
        """
        return await self._spec(workflow, max_depth, _is_large(workflow))

    async def _spec(self, workflow: pb.Workflow, max_depth: int, large: bool) -> WorkflowSpec:
        key = (await _sized(large, functools.partial(content_hash, workflow)), max_depth)
        kept = self._specs.get(key)
        if kept is not None:
            return kept[0]
        spec = await _sized(large, functools.partial(check_workflow, workflow, max_depth=max_depth))
        self._specs[key] = (spec, workflow.ByteSize())
        return spec

    async def start_run(
        self,
        *,
        workflow: pb.Workflow,
        inputs: struct_pb2.Struct,
        limits: common_pb2.ResourceLimits,
        context: common_pb2.RequestContext,
        request_id: str = "",
        durability: pb.RunDurability.ValueType = pb.RUN_DURABILITY_ASYNC,
        verbosity: pb.RunVerbosity.ValueType = pb.RUN_VERBOSITY_STEPS,
    ) -> tuple[pb.Run, bool]:
        """Checks and starts a run; returns it and whether this call created it. With
        ``RUN_DURABILITY_SYNC``, a step's completion is stored before its dependents start; with
        ``RUN_VERBOSITY_PROGRESS``, every event of a step's execution at Tier 3 is recorded too.

        Raises:
            InvalidArgumentError: The workflow or the inputs are malformed; every problem is named.
        """
        spec = await self.check(workflow, limits)
        bound = spec.bind_inputs(from_struct(inputs))
        run = pb.Run(
            run_id=uuid.uuid4().hex,
            workflow_name=spec.name,
            state=pb.RUN_STATE_PENDING,
            create_time=now_timestamp(),
            correlation_id=context.correlation_id,
            request_id=request_id,
            tenant_id=context.tenant_id,
            user_id=context.user_id,
            inputs=to_struct(bound),
            steps=[pb.StepRun(step_id=path, state=pb.STEP_STATE_PENDING) for path in spec.paths()],
            durability=durability or pb.RUN_DURABILITY_ASYNC,
            verbosity=verbosity or pb.RUN_VERBOSITY_STEPS,
        )
        # Once stored, a run is driven even if this call is cancelled meanwhile (its caller went away).
        return await asyncio.shield(self._create(run, spec, workflow, limits))

    async def _create(
        self, run: pb.Run, spec: WorkflowSpec, workflow: pb.Workflow, limits: common_pb2.ResourceLimits
    ) -> tuple[pb.Run, bool]:
        # A goal's runs (started by Coordinate with its tier key) are bounded by the goal quota instead,
        # so that a goal never fails for runs of its own it has to wait for. Without auth nothing tells
        # them apart (and the tenant is whatever the request names), so the quota needs auth on.
        caller = current()
        most = self._tenant_runs if caller is not None and caller.role is not Role.TIER else 0
        stored, fence = await self._store.create_run(StoredRun(run, workflow, limits), self.owner, most=most)
        if fence is None:
            return stored, False
        live = self._track(run, spec, limits, fence)
        live.task = asyncio.create_task(self._drive(live, resumed=None), name=f"run-{run.run_id}")
        _log.info("run %s of %s started (%d steps)", run.run_id, spec.name, len(live.steps))
        return run, True

    def _forget(self, live: _LiveRun) -> None:
        """Stops tracking a run that ended here, unless this manager has taken it up again since."""
        if self._live.get(live.run.run_id) is live:
            del self._live[live.run.run_id]

    def _track(self, run: pb.Run, spec: WorkflowSpec, limits: common_pb2.ResourceLimits, fence: Fence) -> _LiveRun:
        live = _LiveRun(run, spec, limits, self._parallelism, fence)
        live.context = RunContext(
            spec,
            from_struct(run.inputs),
            live.output_of,
            self._variable_recorder(live),
            self.context_operations,
            max_bytes=self._max_message_bytes,
        )
        self._live[run.run_id] = live
        return live

    def _variable_recorder(self, live: _LiveRun) -> Callable[[str, JSON], None]:
        def record(name: str, value: JSON) -> None:
            self._append(live, variable_set=pb.VariableSet(name=name, value=to_value(value)))

        return record

    async def _resume(self, stored: StoredRun, fence: Fence, history: list[pb.RunEvent], reason: str) -> _LiveRun:
        """Continues a stored run this manager has claimed: completed steps keep their outputs, steps
        that were in flight run again with the same attempt (and so the same idempotency key at Tier 3)."""
        run = stored.run
        spec = await self.spec(stored.workflow, _max_depth(stored.limits))
        live = self._track(run, spec, stored.limits, fence)
        live.feed.extend(history)
        shares: dict[str, common_pb2.ResourceLimits] = {}
        retried: dict[str, int] = {}  # by step: the attempt that failed last and waited to be tried again
        given: list[common_pb2.BudgetWarning] = []
        for event in history:
            if event.sequence > run.last_sequence:  # newer than the stored record: replay it
                _replay(live, event)
            kind = event.WhichOneof("payload")
            if kind in ("step_completed", "step_retried", "step_failed"):  # every attempt is charged
                add_usage(live.usage, getattr(event, kind).usage)
            if kind == "step_retried":
                retried[event.step_retried.step_id] = event.step_retried.attempt
            elif kind == "step_started":
                started = event.step_started
                retried.pop(started.step_id, None)
                if started.HasField("limits"):
                    shares[started.step_id] = started.limits
                else:  # an attempt with no share: an earlier attempt's is not held any more
                    shares.pop(started.step_id, None)
            elif kind == "budget_warning":
                given.append(event.budget_warning)
        live.warnings = BudgetWarnings(stored.limits, given)
        if history:
            run.last_sequence = max(run.last_sequence, history[-1].sequence)
        live.output_bytes = sum(state.output.ByteSize() for state in live.steps.values())
        for path, state in live.steps.items():
            if state.state == pb.STEP_STATE_RUNNING:
                state.state = pb.STEP_STATE_PENDING
                if retried.get(path) == state.attempt:
                    continue  # its attempt failed and was charged: the next one runs, not that one again
                live.rerun.add(path)
                if path in shares:  # Tier 3 joins it under the same limits: its share stays taken
                    live.reserved[path] = shares[path]
        run.state = pb.RUN_STATE_RUNNING
        live.task = asyncio.create_task(self._drive(live, resumed=reason), name=f"run-{run.run_id}")
        _log.info("run %s resumed (%s)", run.run_id, reason)
        return live

    async def get_run(self, run_id: str) -> pb.Run:
        """Returns a run of the calling tenant; every call that names a run looks it up here first.

        Raises:
            NotFoundError: No run of the calling tenant (any, with auth off) has that id.
        """
        tenant = tenant_scope()
        live = self._live.get(run_id)
        if live is not None and tenant in (None, live.run.tenant_id):
            return live.run
        run = await self._store.get_run(run_id, tenant=tenant)
        if run is None:
            raise NotFoundError("run", run_id)
        return run

    async def list_runs(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[pb.Run]:
        """Returns up to ``limit`` runs of the calling tenant, newest first, older than the cursor ``after``."""
        runs = await self._store.list_runs(limit=limit, after=after, state=state, tenant=tenant_scope())
        return [self._live[run.run_id].run if run.run_id in self._live else run for run in runs]

    async def _stop(self, run_id: str, kind: str, reason: str) -> pb.Run:
        run = await self.get_run(run_id)
        live = self._live.get(run_id)
        if live is None or live.task is None or live.feed.ended:
            if live is None and run.state in UNFINISHED:  # another replica drives it
                await self._store.request_control(run_id, kind, reason)
                stopped = await self._until_stopped(run_id)
                if kind == "cancel" and stopped.state == pb.RUN_STATE_PAUSED:  # paused meanwhile
                    return await self.cancel_run(run_id, reason)
                return stopped
            raise FailedPreconditionError(
                f"run {run_id} is not running ({pb.RunState.Name(run.state)})",
                reason="RUN_NOT_RUNNING",
                metadata={"run_id": run_id},
            )
        _ask_stop(live, kind, reason)
        await asyncio.wait({live.task})
        return live.run

    async def _until_stopped(self, run_id: str) -> pb.Run:
        """Waits until a run another replica drives is no longer pending or running, and returns it.

        Raises:
            UnavailableError: It goes on after three leases: neither its owner nor a replica taking it
                over has acted on the request (which stays in the store for whoever drives it next).
        """
        deadline = time.monotonic() + 3 * self._store.lease_seconds
        while (run := await self.get_run(run_id)).state in UNFINISHED:
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"run {run_id} is driven by another replica, which has not acted on the request yet",
                    metadata={"run_id": run_id},
                )
            await self._store.wait_changed(run_id, _WATCH_WAIT)
        return run

    def request_cancel(self, run_id: str, reason: str) -> None:
        """Asks a live run to stop, without waiting; does nothing for a run not executing here."""
        live = self._live.get(run_id)
        if live is not None and not self._closing:
            _ask_stop(live, "cancel", reason)

    async def cancel_run(self, run_id: str, reason: str) -> pb.Run:
        """Cancels a run, waits until its steps have stopped, and returns it.

        Raises:
            NotFoundError: No run has that id.
            FailedPreconditionError: The run has ended.
        """
        if run_id not in self._live:  # another tenant's run is not found here, nor by _stop
            stored = await self._store.get_stored(run_id, tenant=tenant_scope())
            if stored is not None and stored.run.state == pb.RUN_STATE_PAUSED:
                try:
                    stored, fence = await self._store.claim(run_id, self.owner, "cancel")
                except IllegalTransitionError:  # resumed or cancelled meanwhile
                    return await self.cancel_run(run_id, reason)
                return await self._cancel_paused(stored, fence, reason or "cancelled")
        return await self._stop(run_id, "cancel", reason or "cancelled")

    async def _cancel_paused(self, stored: StoredRun, fence: Fence, reason: str) -> pb.Run:
        spec = await self.spec(stored.workflow, _max_depth(stored.limits))
        live = self._track(stored.run, spec, stored.limits, fence)
        live.feed.extend(await self._store.events(stored.run.run_id, after_sequence=0))
        run = live.run
        try:
            run.state = pb.RUN_STATE_CANCELLED
            run.end_time.CopyFrom(now_timestamp())
            await self._transition(live, run_cancelled=pb.RunCancelled(reason=reason))
        finally:
            live.feed.end()
            self._forget(live)
        return run

    async def delete_run(self, run_id: str) -> None:
        """Deletes a finished run and its events.

        Raises:
            NotFoundError: No run has that id.
            FailedPreconditionError: The run has not ended.
        """
        run = await self.get_run(run_id)
        if run_id in self._live or run.state not in FINISHED:
            raise FailedPreconditionError(
                f"run {run_id} has not ended ({pb.RunState.Name(run.state)}); cancel it first",
                reason="RUN_NOT_FINISHED",
                metadata={"run_id": run_id},
            )
        await self._store.delete_runs([run_id])
        _log.info("run %s deleted", run_id)

    async def _delete_finished(self, before: float) -> None:
        """Deletes the runs that ended before ``before`` (seconds since the epoch), with their events."""
        while True:
            found = await self._store.finished_before(int(before * 1e9), limit=_DELETE_BATCH)
            ended = [run_id for run_id in found if run_id not in self._live]
            if ended:
                await self._store.delete_runs(ended)
                _log.info("deleted %d runs that ended more than the retention ago", len(ended))
            if len(found) < _DELETE_BATCH or not ended:
                return

    async def pause_run(self, run_id: str, reason: str) -> pb.Run:
        """Pauses a run: steps in flight are cancelled and will run again on resume.

        Raises:
            NotFoundError: No run has that id.
            FailedPreconditionError: The run is not running.
        """
        return await self._stop(run_id, "pause", reason or "paused")

    async def resume_run(self, run_id: str) -> pb.Run:
        """Resumes a paused run.

        Raises:
            NotFoundError: No run has that id.
            FailedPreconditionError: The run is not paused.
        """
        await self.get_run(run_id)
        # Once claimed, a run is driven even if this call is cancelled meanwhile.
        return await asyncio.shield(self._resume_paused(run_id))

    async def _resume_paused(self, run_id: str) -> pb.Run:
        try:  # one compare-and-set in the store: of two resumes at once, one wins
            stored, fence = await self._store.claim(run_id, self.owner, "resume")
        except IllegalTransitionError:
            run = await self.get_run(run_id)
            raise FailedPreconditionError(
                f"run {run_id} is not paused ({pb.RunState.Name(run.state)})", reason="RUN_NOT_PAUSED"
            ) from None
        history = await self._store.events(run_id, after_sequence=0)
        return (await self._resume(stored, fence, history, "resumed on request")).run

    async def resolve(self, run_id: str, expressions: Sequence[str]) -> list[JSON]:
        """Resolves template expressions in a run's context, in one batch.

        Raises:
            NotFoundError: No run has that id.
            InvalidArgumentError: An expression is malformed or names nothing that exists yet.
        """
        live = self._live.get(run_id)
        if live is not None:
            await self.get_run(run_id)  # of the calling tenant
        else:
            stored = await self._store.get_stored(run_id, tenant=tenant_scope())
            if stored is None:
                raise NotFoundError("run", run_id)
            spec = await self.spec(stored.workflow, _max_depth(stored.limits))
            live = _LiveRun(stored.run, spec, stored.limits, self._parallelism)
            for event in await self._store.events(run_id, after_sequence=stored.run.last_sequence):
                _replay(live, event)
            live.context = RunContext(
                live.spec,
                from_struct(stored.run.inputs),
                live.output_of,
                lambda *_: None,
                self.context_operations,
                max_bytes=self._max_message_bytes,
            )
        try:
            return live.context.resolve_all(expressions)
        except TemplateError as exc:
            raise InvalidArgumentError([Violation(exc.field, exc.message)], reason="UNRESOLVABLE") from None

    async def watch(self, run_id: str, *, after_sequence: int = 0) -> AsyncIterator[pb.RunEvent]:
        """Yields a run's events after ``after_sequence``: stored history, then live events until
        the run ends or pauses.

        Raises:
            NotFoundError: No run has that id.
        """
        await self.get_run(run_id)
        live = self._live.get(run_id)
        if live is None:
            async for event in self._stored_events(run_id, after_sequence):
                after_sequence = event.sequence
                yield event
            live = self._live.get(run_id)  # taken over here meanwhile
            if live is None:
                return
        async for event in live.feed.follow(after_sequence):
            yield event

    async def _stored_events(self, run_id: str, after_sequence: int) -> AsyncIterator[pb.RunEvent]:
        """Yields the stored events of a run not driven here, a page at a time (a watcher that reads
        slowly holds no more than one), and those stored later while another replica drives it, until
        it ends or pauses, or this manager takes it over."""
        while run_id not in self._live:
            run = await self._store.get_run(run_id)  # read first: events stored with its end come after
            page = await self._store.events(run_id, after_sequence=after_sequence, limit=WATCH_PAGE)
            for event in page:
                yield event
            if page:
                after_sequence = page[-1].sequence
            if len(page) == WATCH_PAGE:
                continue
            if run is None or run.state not in UNFINISHED:
                return
            await self._store.wait_changed(run_id, _WATCH_WAIT)

    def _append(self, live: _LiveRun, *, with_run: bool = False, **payload: Any) -> asyncio.Future[None]:
        """Records one event through the write-behind log."""
        return self._record(live, pb.RunEvent(**payload), with_run=with_run)

    def _record(self, live: _LiveRun, event: pb.RunEvent, *, with_run: bool = False) -> asyncio.Future[None]:
        """Numbers, stamps and records an event whose payload is already set."""
        run = live.run
        run.last_sequence += 1
        event.sequence = run.last_sequence
        event.run_id = run.run_id
        event.correlation_id = run.correlation_id
        event.time.FromNanoseconds(time.time_ns())
        assert live.fence is not None, "only a run this manager owns is written"
        return self.log.record(run, event, live.feed.extend, fence=live.fence, on_lost=live.lost, with_run=with_run)

    async def _transition(self, live: _LiveRun, **payload: Any) -> None:
        """Records a transition of the run itself, with its record, and waits until both are stored."""
        await asyncio.shield(self._append(live, with_run=True, **payload))

    async def _drive(self, live: _LiveRun, *, resumed: str | None) -> None:
        run = live.run
        if run.tenant_id:  # the run's calls to Tier 3 are for its tenant and starter, whoever resumed it
            act_as(Principal(run.tenant_id, run.user_id, Role.RUN))
        try:
            run.state = pb.RUN_STATE_RUNNING
            if resumed is None:
                started = pb.RunStarted(workflow_name=run.workflow_name, step_count=len(live.spec.steps))
                await self._transition(live, run_started=started)
            else:
                done = sum(state.state == pb.STEP_STATE_COMPLETED for state in live.steps.values())
                await self._transition(live, run_resumed=pb.RunResumed(reason=resumed, completed_steps=done))
                self._warn(live)  # what the run crossed while no server drove it
            error = await self._run_in_time(live)
            run.end_time.CopyFrom(now_timestamp())
            elapsed = (run.end_time.ToNanoseconds() - run.create_time.ToNanoseconds()) / 1e9
            live.usage.duration.CopyFrom(to_duration(elapsed))
            if error is None:
                declared = live.context.outputs()
                if declared is None:
                    outputs = {s.id: output for s in live.spec.steps if (output := live.output_of(s.id)) is not None}
                else:
                    outputs = {name: to_value(value) for name, value in declared.items()}
                completed = pb.RunCompleted(outputs=outputs, usage=live.usage)
                if (size := completed.ByteSize()) > self._max_total_output_bytes:
                    # Failed rather than completed: the event would not fit the messages that carry it.
                    error = output_too_large(_TIER, "a run's outputs", size, self._max_total_output_bytes)
                else:
                    run.outputs.MergeFrom(completed.outputs)
                    run.state = pb.RUN_STATE_COMPLETED
                    await self._transition(live, run_completed=completed)
            if error is not None:
                run.state = pb.RUN_STATE_FAILED
                run.error.CopyFrom(error)
                await self._transition(live, run_failed=pb.RunFailed(error=error, usage=live.usage))
        except asyncio.CancelledError:
            if self._closing or live.stop == "lost":
                raise  # the server is stopping, or another owner drives the run now: nothing more to write
            if run.state in (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_FAILED):
                return  # its end is recorded already (and stored, shielded): a stop asked too late changes nothing
            if live.stop == "pause":
                run.state = pb.RUN_STATE_PAUSED
                await self._transition(live, run_paused=pb.RunPaused(reason=live.stop_reason))
            else:
                run.state = pb.RUN_STATE_CANCELLED
                run.end_time.CopyFrom(now_timestamp())
                await self._transition(live, run_cancelled=pb.RunCancelled(reason=live.stop_reason))
        except Exception:
            _log.exception("run %s crashed", run.run_id)
            run.state = pb.RUN_STATE_FAILED
            run.error.CopyFrom(_error("INTERNAL", "the orchestrator failed while running the workflow"))
            await self._transition(live, run_failed=pb.RunFailed(error=run.error, usage=live.usage))
        finally:
            live.feed.end()
            self._forget(live)
            if live.stop != "lost":  # else it goes on under its new owner, which counts its end
                self.finished_runs[pb.RunState.Name(run.state)] += 1
                _log.info("run %s is %s", run.run_id, pb.RunState.Name(run.state))

    async def _run_in_time(self, live: _LiveRun) -> common_pb2.ErrorDetail | None:
        """Runs the run's graph; once the run's ``max_duration`` has passed since it was created (a
        restart changes nothing), its steps are cancelled and it fails with DEADLINE_EXCEEDED."""
        limit = to_seconds(live.limits.max_duration)
        if limit is None:
            return await self._run_graph(live, live.spec, live.context, "")
        age = _age(live)
        loop = asyncio.get_running_loop()
        # The duration warnings, each at its share of the limit: timers owned by the run's task.
        timers = [loop.call_later(max(at - age, 0.0), self._warn, live, at) for at in live.warnings.times()]
        within = asyncio.timeout(limit - age)
        try:
            async with within:
                return await self._run_graph(live, live.spec, live.context, "")
        except TimeoutError:
            if not within.expired():
                raise
        finally:
            for timer in timers:
                timer.cancel()
        return _error("DEADLINE_EXCEEDED", f"the run took longer than its limits.max_duration of {limit:g} s")

    async def _run_graph(
        self, live: _LiveRun, spec: WorkflowSpec, context: RunContext, prefix: str
    ) -> common_pb2.ErrorDetail | None:
        """Runs one (sub)workflow: each step starts once its dependencies have settled; returns the
        first failure of a required step."""
        for step in spec.steps:
            state = live.steps[prefix + step.id]
            if state.state != pb.STEP_STATE_COMPLETED:  # a fresh start, a retry of a nested workflow
                state.state = pb.STEP_STATE_PENDING
                state.ClearField("error")
                state.skip_reason = ""
        settled = {step.id for step in spec.steps if live.steps[prefix + step.id].state == pb.STEP_STATE_COMPLETED}
        waiting = {s.id: sum(d not in settled for d in s.depends_on) for s in spec.steps if s.id not in settled}
        if not waiting:
            return None
        outcome: asyncio.Future[common_pb2.ErrorDetail | None] = asyncio.get_running_loop().create_future()
        running: dict[asyncio.Task[common_pb2.ErrorDetail | None], str] = {}
        unsettled = len(waiting)
        blocked_by: dict[str, str] = {}  # a step's first dependency that settled without completing

        # Steps are started from their dependencies' done callbacks: no task waits on the whole
        # running set, so a wide DAG costs no more per step than a chain.
        def start(step_id: str) -> None:
            step = spec.by_id[step_id]
            gate = _gate(step, context, blocked_by.get(step_id))
            if step.workflow is None and not gate:
                live.ready.add(prefix + step_id)  # counted from now on when the other steps take their shares
            task = asyncio.create_task(self._run_step(live, step, context, prefix, gate))
            running[task] = step_id
            task.add_done_callback(settle)

        def settle(task: asyncio.Task[common_pb2.ErrorDetail | None]) -> None:
            nonlocal unsettled
            step_id = running.pop(task)
            live.ready.discard(prefix + step_id)
            if outcome.done() or task.cancelled():
                return
            if task.exception() is not None:
                outcome.set_exception(task.exception())  # type: ignore[arg-type]
                return
            error = task.result()
            if error is not None and not spec.by_id[step_id].optional:
                outcome.set_result(error)
                return
            unsettled -= 1
            if unsettled == 0:
                outcome.set_result(None)
            completed = live.steps[prefix + step_id].state == pb.STEP_STATE_COMPLETED
            for dependent in spec.dependents[step_id]:
                if not completed:
                    blocked_by.setdefault(dependent, step_id)
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    start(dependent)

        for step_id in [step_id for step_id, count in waiting.items() if count == 0]:
            start(step_id)
        try:
            return await outcome
        finally:
            tasks = list(running)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _interrupted_state(self, live: _LiveRun) -> pb.StepState.ValueType:
        if self._closing:
            return pb.STEP_STATE_RUNNING  # still in flight as far as the next process knows
        return pb.STEP_STATE_PENDING if live.stop == "pause" else pb.STEP_STATE_CANCELLED

    async def _run_step(
        self, live: _LiveRun, step: StepSpec, context: RunContext, prefix: str, gate: str | common_pb2.ErrorDetail
    ) -> common_pb2.ErrorDetail | None:
        """Settles one step: skips it (``gate`` says why), fails it (``gate`` is its condition's
        failure), or runs it, retrying per its policy; returns its failure."""
        path = prefix + step.id
        state = live.steps[path]
        try:
            if isinstance(gate, common_pb2.ErrorDetail):
                return self._fail(live, path, gate)
            if gate:
                state.state = pb.STEP_STATE_SKIPPED
                state.skip_reason = gate
                self._append(live, step_skipped=pb.StepSkipped(step_id=path, reason=gate))
                return None
            while True:
                error, usage = await self._attempt(live, step, context, prefix)
                if error is None:
                    return None
                if error.reason in PERMANENT_FAILURES or state.attempt >= step.retry.max_attempts:
                    return self._fail(live, path, error, usage)
                backoff = step.retry.backoff(state.attempt)
                retried = pb.StepRetried(
                    step_id=path, attempt=state.attempt, error=error, backoff=to_duration(backoff), usage=usage
                )
                self._append(live, step_retried=retried)
                await asyncio.sleep(backoff)
        except asyncio.CancelledError:
            if state.state != pb.STEP_STATE_COMPLETED:  # stored already (the log writes in order) or about to be
                state.state = self._interrupted_state(live)
            raise

    def _fail(
        self,
        live: _LiveRun,
        path: str,
        error: common_pb2.ErrorDetail,
        usage: common_pb2.ResourceUsage | None = None,
    ) -> common_pb2.ErrorDetail:
        error.metadata["step_id"] = path
        state = live.steps[path]
        state.state = pb.STEP_STATE_FAILED
        state.error.CopyFrom(error)
        self._append(live, step_failed=pb.StepFailed(step_id=path, error=error, usage=usage))
        return error

    async def _attempt(
        self, live: _LiveRun, step: StepSpec, context: RunContext, prefix: str
    ) -> tuple[common_pb2.ErrorDetail | None, common_pb2.ResourceUsage]:
        """Makes one attempt at a step, charging what it used to the run; on success records its output
        and returns no error; on failure, returns the error and what the attempt used."""
        await self.log.room()  # while the store falls behind, no step adds to what waits for it
        path = prefix + step.id
        state = live.steps[path]
        if path in live.rerun:
            live.rerun.discard(path)
        else:
            state.attempt += 1
        rendered = self._render(step, context)
        if step.workflow is not None:
            self._started(live, path, "workflow", None)
            if isinstance(rendered, common_pb2.ErrorDetail):
                return rendered, common_pb2.ResourceUsage()
            output, usage, error = await self._run_nested(live, step.workflow, rendered[0], path)
        else:
            for asked in itertools.count():
                async with self._slot_and_share(live, path) as (share, spent):
                    if not asked:
                        self._started(live, path, step.tool, None if spent else share)
                    if isinstance(rendered, common_pb2.ErrorDetail):
                        return rendered, common_pb2.ResourceUsage()
                    if spent:
                        return _error("BUDGET_EXHAUSTED", f"the run's {spent}"), common_pb2.ResourceUsage()
                    attributes: dict[str, str | int] = {
                        "tierstack.run_id": live.run.run_id,
                        "tierstack.tool": step.tool,
                        "tierstack.attempt": state.attempt,
                    }
                    execution_id = f"{live.run.run_id}/{path}/{state.attempt}" + (f"~{asked}" if asked else "")
                    with span(f"step {path}", attributes):
                        output, usage, error = await self._execute(live, step, path, *rendered, execution_id, share)
                    self._charge(live, usage)  # before its share goes back: the two never miss each other
                    others_hold_shares = len(live.reserved) > 1
                # Tier 3 refused, before running anything, calls that cost more than the share: while
                # other steps hold shares, the step waits for one to come back and asks for a larger one.
                if error is None or error.reason != "STEP_BUDGET_EXCEEDED" or not others_hold_shares:
                    break
                await live.freed.wait()
        if error is not None:
            return error, usage
        seconds = to_seconds(usage.duration) or 0.0
        self.step_latency.record(seconds)
        if step.workflow is None:
            previous = self._tool_seconds.get(step.tool)
            self._tool_seconds[step.tool] = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        if (size := output.ByteSize()) > self._max_output_bytes:
            return output_too_large(_TIER, "a step's output", size, self._max_output_bytes), usage
        if live.output_bytes + size > self._max_held_bytes:
            held = live.output_bytes + size
            return output_too_large(_TIER, "a run's step outputs together", held, self._max_held_bytes), usage
        live.output_bytes += size
        state.state = pb.STEP_STATE_COMPLETED
        state.output.CopyFrom(output)
        # Written with the next commit. A run of async durability does not wait for it: dependents
        # start at once; nobody sees the event before it is stored, and a crash before then runs the
        # step again, under the same idempotency key, so Tier 3 replays the result instead of running
        # the tool twice. A run of sync durability waits until it is stored.
        written = self._append(live, step_completed=pb.StepCompleted(step_id=path, output=output, usage=usage))
        if live.run.durability == pb.RUN_DURABILITY_SYNC:
            await asyncio.shield(written)
        return None, usage

    def _render(self, step: StepSpec, context: RunContext) -> tuple[dict[str, JSON], str] | common_pb2.ErrorDetail:
        """Returns a step's arguments and prompt, its templates rendered, or why they cannot be."""
        try:
            budget = Budget(self._max_message_bytes)  # what one request to Tier 3 can carry
            arguments = render(step.parameters, context.resolve, "parameters", budget)
            prompt = render(step.prompt, context.resolve, "prompt", budget)
        except TooLargeError as exc:
            return _error("REQUEST_TOO_LARGE", exc.message, field=exc.field)
        except TemplateError as exc:
            return _error("TEMPLATE_ERROR", exc.message, field=exc.field)
        assert isinstance(arguments, dict)
        return arguments, str(prompt)

    def _started(self, live: _LiveRun, path: str, tool: str, share: common_pb2.ResourceLimits | None) -> None:
        """Records that an attempt at a step starts, within ``share`` of the run's budget (a tool step's)."""
        state = live.steps[path]
        state.state = pb.STEP_STATE_RUNNING
        started = pb.StepStarted(step_id=path, attempt=state.attempt, tool=tool, limits=share)
        self._append(live, step_started=started)

    @contextlib.asynccontextmanager
    async def _slot_and_share(self, live: _LiveRun, path: str) -> AsyncIterator[tuple[common_pb2.ResourceLimits, str]]:
        """Holds one of the run's slots and a tool step's share of the run's budget while the step
        runs at Tier 3; yields the share, or (with no share) what is spent.

        The share is what the run has left once the shares of its steps in flight are taken off, split
        evenly between this step and the others started that hold no share yet, as many of them as
        the run's parallelism lets run beside it (see :meth:`_take_share`). So the steps in flight
        together never hold more than the run has left, and each ends within its own share, which
        Tier 3 holds it to. A step that finds nothing left while other steps hold shares waits, its
        slot given up, until one of them gives its share back (what that step did not use is left
        again); with no share held, nothing left means the run's budget is spent."""
        while True:
            self.queued_steps += 1
            try:
                await live.slots.acquire()
            finally:
                self.queued_steps -= 1
            taken = self._take_share(live, path)
            if taken is not None:
                break
            live.slots.release()
            await live.freed.wait()
        try:
            yield taken
        finally:
            if live.reserved.pop(path, None) is not None:
                live.freed.set()
                live.freed = asyncio.Event()
            live.slots.release()

    @staticmethod
    def _take_share(live: _LiveRun, path: str) -> tuple[common_pb2.ResourceLimits, str] | None:
        """Reserves a step's share of what the run has left (see :meth:`_slot_and_share`) and returns
        it; or, when nothing is left, returns what is spent if no step holds a share, else None (the
        step waits for one to come back)."""
        share = live.reserved.get(path)  # a step in flight when the run was last driven keeps its share
        if share is None:
            left = unreserved(live.limits, live.usage, live.reserved.values())
            if any(value <= 0 for value in left.values()):
                if live.reserved:
                    return None
                live.ready.discard(path)
                return common_pb2.ResourceLimits(), spent_message(live.limits, left)
            others = len(live.ready) - (path in live.ready)
            beside = min(others, max(live.parallelism - len(live.reserved) - 1, 0))
            share = live.reserved[path] = share_of(left, 1 / (1 + beside))
        live.ready.discard(path)
        return share, ""

    def _charge(self, live: _LiveRun, usage: common_pb2.ResourceUsage) -> None:
        """Charges what a step used to the run, and gives the budget warnings that earns."""
        add_usage(live.usage, usage)
        self._warn(live)

    def _warn(self, live: _LiveRun, at: float = 0.0) -> None:
        """Records the budget warnings the run has earned and not had; ``at`` is the age (in seconds)
        a duration warning's timer was set for, counted as reached when the timer fires."""
        for warning in live.warnings.due(live.usage, max(_age(live), at)):
            _log.info("run %s: %s", live.run.run_id, describe_warning(warning))
            self._append(live, budget_warning=warning)

    async def _run_nested(
        self, live: _LiveRun, spec: WorkflowSpec, arguments: dict[str, JSON], path: str
    ) -> tuple[struct_pb2.Value, common_pb2.ResourceUsage, common_pb2.ErrorDetail | None]:
        """Runs a nested workflow with the step's arguments as its inputs, in a context of its own."""
        usage = common_pb2.ResourceUsage()
        try:
            inputs = spec.bind_inputs(arguments, field="parameters")
        except InvalidArgumentError as exc:
            return to_value(None), usage, _error("INVALID_INPUTS", exc.message)
        prefix = f"{path}/"
        context = RunContext(
            spec,
            inputs,
            lambda step_id: live.output_of(prefix + step_id),
            self._variable_recorder(live),
            self.context_operations,
            max_bytes=self._max_message_bytes,
        )
        error = await self._run_graph(live, spec, context, prefix)
        if error is not None:
            return to_value(None), usage, error
        declared = context.outputs()
        if declared is None:
            declared = {s.id: from_value(out) for s in spec.steps if (out := live.output_of(prefix + s.id)) is not None}
        return to_value(declared), usage, None

    async def _execute(
        self,
        live: _LiveRun,
        step: StepSpec,
        path: str,
        arguments: dict[str, JSON],
        prompt: str,
        execution_id: str,
        share: common_pb2.ResourceLimits,
    ) -> tuple[struct_pb2.Value, common_pb2.ResourceUsage, common_pb2.ErrorDetail | None]:
        """Runs one tool step in Tier 3 within its ``share`` of the run's budget, forwarding its events;
        the execution id is the idempotency key."""
        request = executor_service_pb2.ExecuteRequest(
            context=common_pb2.RequestContext(
                correlation_id=live.run.correlation_id,
                tenant_id=live.run.tenant_id,
                user_id=live.run.user_id,
                parent_execution_id=live.run.run_id,
            ),
            execution_id=execution_id,
            step_id=path,
            tool_calls=[common_pb2.ToolCall(tool=step.tool, arguments=to_struct(arguments))],
            strategy=step.strategy,
            prompt=prompt,
            limits=share,
            progress=live.run.verbosity == pb.RUN_VERBOSITY_PROGRESS,
        )
        if step.timeout_seconds is not None:
            request.limits.max_duration.CopyFrom(to_duration(step.timeout_seconds))
        if (size := request.ByteSize()) > self._max_message_bytes:
            message = f"the step's request to Tier 3 has {size} bytes; a message may have {self._max_message_bytes}"
            return to_value(None), common_pb2.ResourceUsage(), _error("REQUEST_TOO_LARGE", message)
        output = to_value(None)
        usage: common_pb2.ResourceUsage | None = None
        error: common_pb2.ErrorDetail | None = None
        deadline = None if step.timeout_seconds is None else time.monotonic() + step.timeout_seconds
        seen = 0  # the executor's events taken so far: asked again, it sends them again first
        for failures in itertools.count():
            lost: common_pb2.ErrorDetail | None = None
            try:
                async for event in self._stopping_at_tier_3(live, request):
                    if event.sequence <= seen:
                        continue
                    seen = event.sequence
                    kind = event.WhichOneof("payload")
                    if kind == "output":
                        output = event.output.value
                    elif kind == "completed":
                        usage = event.completed.usage
                    elif kind == "failed":
                        error, usage = event.failed.error, event.failed.usage
                    else:  # the output and the end travel in StepCompleted / StepFailed, not twice
                        forwarded = pb.RunEvent()
                        forwarded.step_execution.step_id = path
                        forwarded.step_execution.event.CopyFrom(event)  # one copy, straight into place
                        self._record(live, forwarded)
            except TierstackError as exc:
                if not _lost_call(exc):
                    error = error_detail_of_call(exc, common_pb2.TIER_EXECUTE)
                lost = error_detail_of_call(exc, common_pb2.TIER_EXECUTE)
            if error is not None or usage is not None:
                break
            lost = lost or _error("EXECUTION_INCOMPLETE", "the executor's stream ended before the step completed")
            # The call was lost on the way (Execute restarting, a dropped stream): the step is asked for
            # again under the same execution id, which Execute replays or joins, until the step's time runs out.
            wait = random.uniform(0, min(TRANSPORT_BACKOFF[1], TRANSPORT_BACKOFF[0] * 2**failures))
            if self._closing or (deadline is not None and time.monotonic() + wait > deadline):
                error = lost
                break
            if failures == 0:
                _log.warning("step %s of run %s: %s; asking again", path, live.run.run_id, lost.message)
            await asyncio.sleep(wait)
        return output, usage or common_pb2.ResourceUsage(), error

    async def _stopping_at_tier_3(
        self, live: _LiveRun, request: executor_service_pb2.ExecuteRequest
    ) -> AsyncIterator[executor_service_pb2.ExecutionEvent]:
        """Yields a step's events from Tier 3, and when the step is cancelled here (the run pauses or is
        cancelled), stops it there too: Tier 3 finishes a step whose caller merely went away. A step
        left by a stopping server, or by one whose run another replica took over (and joins the step
        under the same execution id), runs on."""
        try:
            async for event in self._runner.execute(request):
                yield event
        except asyncio.CancelledError:
            if not self._closing and live.stop != "lost":
                task = asyncio.create_task(self._cancel_at_tier_3(request.execution_id))
                self._cancelling.add(task)
                task.add_done_callback(self._cancelling.discard)
            raise

    async def _cancel_at_tier_3(self, execution_id: str) -> None:
        try:
            await self._runner.cancel_execution(execution_id)
        except TierstackError as exc:  # it ends with its own time limit, then
            _log.info("could not stop step %s at Tier 3: %s", execution_id, message_of(exc))


def _lost_call(error: TierstackError) -> bool:
    """Says whether a call to Execute was lost on the way, or turned away for now, rather than answered:
    Execute could not be reached, the call ended without an answer from a tierstack server, or Execute
    had no room for another execution just then."""
    return (
        error.code.name == "UNAVAILABLE"
        or (error.code.name == "CANCELLED" and error.domain != ERROR_DOMAIN)
        or error.reason in _BUSY
    )


#: The reasons Execute gives when it has no room for another execution or call until some end.
_BUSY = frozenset({"TOO_MANY_EXECUTIONS", "TOO_MANY_CALLS"})


def _age(live: _LiveRun) -> float:
    """Returns the seconds since a run was created (a restart changes nothing)."""
    return (time.time_ns() - live.run.create_time.ToNanoseconds()) / 1e9


def _gate(step: StepSpec, context: RunContext, blocked: str | None) -> str | common_pb2.ErrorDetail:
    """Returns why a step whose dependencies settled is skipped (``blocked`` names one that did not
    complete, or its `when` condition is false), its condition's failure, or "" when it runs."""
    if blocked is not None:
        return f"dependency {blocked!r} did not complete"
    if step.when is None:
        return ""
    try:
        return "" if context.holds(step.when) else "its `when` condition is false"
    except JMESPathError as exc:
        return _error("CONDITION_ERROR", f"`when` failed: {exc}")


def _replay(live: _LiveRun, event: pb.RunEvent) -> None:
    """Applies a step event to the run's step states (resuming from events newer than its record)."""
    kind = event.WhichOneof("payload")
    if kind == "step_started":
        state = live.steps[event.step_started.step_id]
        state.state, state.attempt = pb.STEP_STATE_RUNNING, event.step_started.attempt
    elif kind == "step_completed":
        completed = event.step_completed
        state = live.steps[completed.step_id]
        state.state = pb.STEP_STATE_COMPLETED
        state.output.CopyFrom(completed.output)
    elif kind == "step_failed":
        state = live.steps[event.step_failed.step_id]
        state.state = pb.STEP_STATE_FAILED
        state.error.CopyFrom(event.step_failed.error)
    elif kind == "step_skipped":
        state = live.steps[event.step_skipped.step_id]
        state.state, state.skip_reason = pb.STEP_STATE_SKIPPED, event.step_skipped.reason


def _ask_stop(live: _LiveRun, kind: str, reason: str) -> None:
    """Asks a live run to cancel or pause (the first request wins)."""
    if live.task is not None and live.stop is None and not live.feed.ended:
        live.stop, live.stop_reason = kind, reason
        live.task.cancel()
