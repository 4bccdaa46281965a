"""The run manager: starts runs, schedules their steps as soon as their dependencies finish,
records every event, and lets callers watch runs from any sequence number."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

from google.protobuf import struct_pb2

from tierstack.client.errors import TierstackError
from tierstack.client.values import from_struct, from_value, now_timestamp, to_duration, to_value
from tierstack.server.errors import FailedPreconditionError, NotFoundError, error_detail, error_detail_of_call
from tierstack.server.orchestrate.planner import Planner
from tierstack.server.orchestrate.store import RunStore, StoredRun
from tierstack.server.orchestrate.templates import TemplateError, render
from tierstack.server.orchestrate.workflow import StepSpec, WorkflowSpec, check_workflow
from tierstack.v1 import common_pb2, executor_service_pb2
from tierstack.v1 import orchestrator_service_pb2 as pb

_log = logging.getLogger(__name__)

#: How many steps of one run may execute at once unless its limits say otherwise.
DEFAULT_PARALLELISM = 16
#: The duration the planner assumes for a tool it has not seen run yet.
DEFAULT_STEP_ESTIMATE_SECONDS = 0.1
_ENDED = (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED)


class StepRunner(Protocol):
    """Runs one step in Tier 3 and yields its events (the Execute client satisfies it)."""

    def execute(
        self, request: executor_service_pb2.ExecuteRequest
    ) -> AsyncIterator[executor_service_pb2.ExecutionEvent]: ...


_error = functools.partial(error_detail, common_pb2.TIER_ORCHESTRATE)


class _LiveRun:
    """A run executing in this process: its state, its event history and who waits for news."""

    def __init__(self, run: pb.Run, spec: WorkflowSpec, limits: common_pb2.ResourceLimits) -> None:
        self.run = run
        self.spec = spec
        self.limits = limits
        self.events: list[pb.RunEvent] = []
        self.finished = False
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.steps = {step.step_id: step for step in run.steps}
        self.scope: dict[str, Any] = {"inputs": from_struct(run.inputs), "steps": {}}
        self.usage = common_pb2.ResourceUsage()

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class RunManager:
    """Runs workflows against a step runner and keeps them in a store.

    Args:
        store: Where runs and events are kept; opened and closed by the caller.
        runner: Executes steps (Tier 3).
        parallelism: The default cap on steps of one run executing at once.
    """

    def __init__(
        self, store: RunStore, runner: StepRunner, *, parallelism: int = DEFAULT_PARALLELISM
    ) -> None:
        self._store = store
        self._runner = runner
        self._parallelism = parallelism
        self._live: dict[str, _LiveRun] = {}
        self._tool_seconds: dict[str, float] = {}
        self.planner = Planner(self._estimate)

    def _estimate(self, step: StepSpec) -> float:
        return self._tool_seconds.get(step.tool, DEFAULT_STEP_ESTIMATE_SECONDS)

    async def open(self) -> None:
        """Marks the runs a previous process left unfinished as failed (they are not resumed)."""
        for stored in await self._store.unfinished_runs():
            run = stored.run
            history = await self._store.events(run.run_id, after_sequence=run.last_sequence)
            run.last_sequence = history[-1].sequence if history else run.last_sequence
            run.state = pb.RUN_STATE_FAILED
            run.error.CopyFrom(
                _error("ORCHESTRATOR_RESTARTED", "the orchestrator stopped while the run was running")
            )
            run.end_time.CopyFrom(now_timestamp())
            run.last_sequence += 1
            event = pb.RunEvent(
                sequence=run.last_sequence,
                time=run.end_time,
                run_id=run.run_id,
                correlation_id=run.correlation_id,
                run_failed=pb.RunFailed(error=run.error),
            )
            await self._store.append_events(run.run_id, [event])
            await self._store.save_run(run)
            _log.warning("run %s was left unfinished by a previous process; marked failed", run.run_id)

    async def close(self) -> None:
        """Cancels every run task and waits for them; their runs stay unfinished in the store."""
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def start_run(
        self,
        *,
        workflow: pb.Workflow,
        inputs: struct_pb2.Struct,
        limits: common_pb2.ResourceLimits,
        context: common_pb2.RequestContext,
        request_id: str = "",
    ) -> tuple[pb.Run, bool]:
        """Checks and starts a run; returns it and whether this call created it.

        Raises:
            InvalidArgumentError: The workflow is malformed; every problem is named.
        """
        spec = check_workflow(workflow)
        run = pb.Run(
            run_id=uuid.uuid4().hex,
            workflow_name=spec.name,
            state=pb.RUN_STATE_PENDING,
            create_time=now_timestamp(),
            correlation_id=context.correlation_id,
            request_id=request_id,
            inputs=inputs,
            steps=[pb.StepRun(step_id=step.id, state=pb.STEP_STATE_PENDING) for step in spec.steps],
        )
        stored = await self._store.create_run(StoredRun(run, workflow, limits))
        if stored.run_id != run.run_id:
            return stored, False
        live = _LiveRun(run, spec, limits)
        self._live[run.run_id] = live
        live.task = asyncio.create_task(self._drive(live), name=f"run-{run.run_id}")
        _log.info("run %s of %s started (%d steps)", run.run_id, spec.name, len(spec.steps))
        return run, True

    async def get_run(self, run_id: str) -> pb.Run:
        """Returns a run.

        Raises:
            NotFoundError: No run has that id.
        """
        live = self._live.get(run_id)
        if live is not None:
            return live.run
        run = await self._store.get_run(run_id)
        if run is None:
            raise NotFoundError("run", run_id)
        return run

    async def list_runs(self, *, limit: int, after: tuple[int, str] | None, state: int) -> list[pb.Run]:
        """Returns up to ``limit`` runs, newest first, older than the cursor ``after``."""
        runs = await self._store.list_runs(limit=limit, after=after, state=state)
        return [self._live[run.run_id].run if run.run_id in self._live else run for run in runs]

    def request_cancel(self, run_id: str, reason: str) -> bool:
        """Asks a live run to stop; returns False when the run is not executing here."""
        live = self._live.get(run_id)
        if live is None or live.task is None or live.finished:
            return False
        if live.cancel_reason is None:
            live.cancel_reason = reason or "cancelled"
            live.task.cancel()
        return True

    async def cancel_run(self, run_id: str, reason: str) -> pb.Run:
        """Cancels a run, waits until its steps have stopped, and returns it.

        Raises:
            NotFoundError: No run has that id.
            FailedPreconditionError: The run has already ended.
        """
        live = self._live.get(run_id)
        if live is not None and live.task is not None and self.request_cancel(run_id, reason):
            await asyncio.wait({live.task})
            return live.run
        run = await self.get_run(run_id)
        raise FailedPreconditionError(
            f"run {run_id} has already ended ({pb.RunState.Name(run.state)})",
            reason="RUN_ALREADY_ENDED",
            metadata={"run_id": run_id},
        )

    async def watch(self, run_id: str, *, after_sequence: int = 0) -> AsyncIterator[pb.RunEvent]:
        """Yields a run's events after ``after_sequence``: stored history, then live events until
        the run ends.

        Raises:
            NotFoundError: No run has that id.
        """
        live = self._live.get(run_id)
        if live is None:
            if await self._store.get_run(run_id) is None:
                raise NotFoundError("run", run_id)
            for event in await self._store.events(run_id, after_sequence=after_sequence):
                yield event
            return
        cursor = after_sequence
        while True:
            changed = live.changed
            while cursor < len(live.events):
                yield live.events[cursor]
                cursor += 1
            if live.finished:
                return
            await changed.wait()

    async def _emit(self, live: _LiveRun, *, save_run: bool = False, **payload: Any) -> None:
        """Records one event (and, for critical transitions, the run) before anyone sees it."""
        async with live.lock:
            run = live.run
            run.last_sequence += 1
            event = pb.RunEvent(
                sequence=run.last_sequence,
                time=now_timestamp(),
                run_id=run.run_id,
                correlation_id=run.correlation_id,
                **payload,
            )
            await self._store.append_events(run.run_id, [event])
            if save_run:
                await self._store.save_run(run)
            live.events.append(event)
            live.notify()

    async def _drive(self, live: _LiveRun) -> None:
        run = live.run
        try:
            run.state = pb.RUN_STATE_RUNNING
            await self._emit(
                live,
                save_run=True,
                run_started=pb.RunStarted(workflow_name=run.workflow_name, step_count=len(live.spec.steps)),
            )
            error = await self._schedule(live)
            run.end_time.CopyFrom(now_timestamp())
            live.usage.duration.CopyFrom(
                to_duration((run.end_time.ToNanoseconds() - run.create_time.ToNanoseconds()) / 1e9)
            )
            if error is None:
                run.state = pb.RUN_STATE_COMPLETED
                outputs = {step.step_id: step.output for step in run.steps}
                await self._emit(
                    live, save_run=True, run_completed=pb.RunCompleted(outputs=outputs, usage=live.usage)
                )
            else:
                run.state = pb.RUN_STATE_FAILED
                run.error.CopyFrom(error)
                await self._emit(live, save_run=True, run_failed=pb.RunFailed(error=error))
        except asyncio.CancelledError:
            if live.cancel_reason is None:
                raise  # the server is stopping: the run stays unfinished in the store
            run.state = pb.RUN_STATE_CANCELLED
            run.end_time.CopyFrom(now_timestamp())
            await self._emit(live, save_run=True, run_cancelled=pb.RunCancelled(reason=live.cancel_reason))
        except Exception:
            _log.exception("run %s crashed", run.run_id)
            run.state = pb.RUN_STATE_FAILED
            run.error.CopyFrom(_error("INTERNAL", "the orchestrator failed while running the workflow"))
            await self._emit(live, save_run=True, run_failed=pb.RunFailed(error=run.error))
        finally:
            live.finished = True
            live.notify()
            self._live.pop(run.run_id, None)
            _log.info("run %s ended %s", run.run_id, pb.RunState.Name(run.state))

    async def _schedule(self, live: _LiveRun) -> common_pb2.ErrorDetail | None:
        """Starts each step as soon as its dependencies completed; returns the first failure."""
        spec = live.spec
        limit = live.limits.max_parallelism or self._parallelism
        waiting = {step.id: len(step.depends_on) for step in spec.steps}
        ready = deque(step.id for step in spec.steps if not step.depends_on)
        running: dict[asyncio.Task[common_pb2.ErrorDetail | None], str] = {}
        try:
            while ready or running:
                while ready and len(running) < limit:
                    step = spec.by_id[ready.popleft()]
                    running[asyncio.create_task(self._run_step(live, step))] = step.id
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step_id = running.pop(task)
                    error = task.result()
                    if error is not None:
                        return error
                    for dependent in spec.dependents[step_id]:
                        waiting[dependent] -= 1
                        if waiting[dependent] == 0:
                            ready.append(dependent)
            return None
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _run_step(self, live: _LiveRun, step: StepSpec) -> common_pb2.ErrorDetail | None:
        """Runs one step through the step runner; returns its error, or None when it completed."""
        try:
            return await self._attempt_step(live, step)
        except asyncio.CancelledError:
            live.steps[step.id].state = pb.STEP_STATE_CANCELLED
            raise

    async def _attempt_step(self, live: _LiveRun, step: StepSpec) -> common_pb2.ErrorDetail | None:
        state = live.steps[step.id]
        state.state = pb.STEP_STATE_RUNNING
        state.attempt += 1
        await self._emit(
            live, step_started=pb.StepStarted(step_id=step.id, attempt=state.attempt, tool=step.tool)
        )
        output = to_value(None)
        usage: common_pb2.ResourceUsage | None = None
        error: common_pb2.ErrorDetail | None = None
        try:
            arguments = render(step.parameters, live.scope)
        except TemplateError as exc:
            error = _error("TEMPLATE_ERROR", exc.message, step_id=step.id, field=exc.field)
        else:
            request = executor_service_pb2.ExecuteRequest(
                context=common_pb2.RequestContext(
                    correlation_id=live.run.correlation_id, parent_execution_id=live.run.run_id
                ),
                execution_id=f"{live.run.run_id}/{step.id}/{state.attempt}",
                step_id=step.id,
                tool_calls=[common_pb2.ToolCall(tool=step.tool, arguments=to_value(arguments).struct_value)],
                strategy=step.strategy,
            )
            if step.timeout_seconds is not None:
                request.limits.max_duration.CopyFrom(to_duration(step.timeout_seconds))
            try:
                async for event in self._runner.execute(request):
                    await self._emit(live, step_execution=pb.StepExecution(step_id=step.id, event=event))
                    kind = event.WhichOneof("payload")
                    if kind == "output":
                        output = event.output.value
                    elif kind == "completed":
                        usage = event.completed.usage
                    elif kind == "failed":
                        error = event.failed.error
            except TierstackError as exc:
                error = error_detail_of_call(exc, common_pb2.TIER_EXECUTE)
            if error is None and usage is None:
                error = _error(
                    "EXECUTION_INCOMPLETE", "the executor's stream ended before the step completed"
                )
        if error is not None:
            error.metadata["step_id"] = step.id
            state.state = pb.STEP_STATE_FAILED
            state.error.CopyFrom(error)
            await self._emit(live, save_run=True, step_failed=pb.StepFailed(step_id=step.id, error=error))
            return error
        assert usage is not None
        seconds = usage.duration.ToNanoseconds() / 1e9
        previous = self._tool_seconds.get(step.tool)
        self._tool_seconds[step.tool] = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        live.usage.tool_calls += usage.tool_calls
        live.usage.tokens += usage.tokens
        live.usage.credits += usage.credits
        state.state = pb.STEP_STATE_COMPLETED
        state.output.CopyFrom(output)
        live.scope["steps"][step.id] = {"output": from_value(output)}
        await self._emit(
            live, save_run=True, step_completed=pb.StepCompleted(step_id=step.id, output=output, usage=usage)
        )
        return None
