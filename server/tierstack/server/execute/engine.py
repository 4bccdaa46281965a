"""The executor: runs tool calls and steps, producing the events of the wire contract."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache
from google.protobuf import struct_pb2

from tierstack.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    Violation,
    brief,
    error_detail,
    output_too_large,
)
from tierstack.core.tracing import span
from tierstack.core.values import from_struct, from_value, now_timestamp, to_duration, to_seconds, to_struct, to_value
from tierstack.server.ai import (
    Completion,
    CompletionRequest,
    LocalModel,
    Message,
    ModelError,
    ModelProvider,
    ModelTool,
    Scope,
)
from tierstack.server.auth.keys import Role
from tierstack.server.auth.principal import current as current_principal
from tierstack.server.auth.principal import namespaced, scoped
from tierstack.server.boundary import MAX_JSON_DEPTH, message_depth
from tierstack.server.bounded import ByteBudgetLRU
from tierstack.server.config import Settings
from tierstack.server.execute.approvals import Approvals
from tierstack.server.execute.monitor import ToolMonitor
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolRegistry
from tierstack.server.execute.store import ExecutionStore, MemoryExecutionStore, stop_key
from tierstack.server.execute.strategies import CONVERSATIONAL, DETERMINISTIC, Routine, StrategySelector
from tierstack.server.execute.strategies import name as strategy_name
from tierstack.server.execute.workers import WorkerPool
from tierstack.server.feed import Feed
from tierstack.v1 import common_pb2, executor_service_pb2

_log = logging.getLogger(__name__)
Events = AsyncIterator[executor_service_pb2.ExecutionEvent]
_TIER = common_pb2.TIER_EXECUTE
_error = functools.partial(error_detail, _TIER)

#: How long a pure tool's result is remembered, in seconds, and how many bytes of results are.
MEMO_SECONDS = 3600.0
MEMO_BYTES = 32 << 20
#: How often a critical tool's failing call is tried, and the first wait between tries.
CRITICAL_ATTEMPTS = 3
CRITICAL_BACKOFF_SECONDS = 0.05
#: The most tool calls a model may make in one step unless its limits say otherwise.
DEFAULT_MODEL_TOOL_CALLS = 8
CONVERSE = "You carry out one task. Call the tools you are offered when they help, then answer plainly."
ANALYSE = "Analyse the task: what is asked, what information is needed, and which tools could provide it."
PLAN = "Plan the task: call every tool the plan needs, with its arguments, in order."
REFINE = "Answer the task from the analysis and the tool results, plainly and briefly."
#: How many executions may be in flight at once (as many as the streams of a tier above carry); more
#: are refused RESOURCE_EXHAUSTED until some end, and Orchestrate asks for them again.
MAX_FLIGHTS = 65_536
#: The events of an execution sent whether or not its caller asks for progress: what a caller acts on.
ALWAYS_SENT = frozenset({"approval_required", "output", "completed", "failed"})
# How long a call for an execution another replica runs waits before it looks again, unless told
# that it finished first.
_ELSEWHERE_WAIT = 0.5
#: How many tool kits (the tools a model-driven step offers, prepared for the model) are kept.
TOOLKIT_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Toolkit:
    """The tools a model-driven strategy may call, by name, and their descriptions for the model."""

    tools: Mapping[str, Tool]
    model_tools: tuple[ModelTool, ...]


_NO_TOOLS = Toolkit({}, ())


class _EventSequence:
    """Numbers and stamps the events of one execution."""

    def __init__(self, execution_id: str, correlation_id: str) -> None:
        self._execution_id = execution_id
        self._correlation_id = correlation_id
        self._sequence = 0

    def __call__(self, **payload: Any) -> executor_service_pb2.ExecutionEvent:
        self._sequence += 1
        return executor_service_pb2.ExecutionEvent(
            sequence=self._sequence,
            time=now_timestamp(),
            execution_id=self._execution_id,
            correlation_id=self._correlation_id,
            **payload,
        )


class Executor:
    """Runs tools from a registry. Arguments are checked against each tool's schema before any
    call runs, so a malformed step fails as a whole without side effects. Tools with a worker
    function run in ``workers``, where their deadline can stop them; without a pool they fail. A tool
    call's or a step's output over ``max_output_bytes`` (in its wire form) fails it with
    ``OUTPUT_TOO_LARGE``, one nested deeper than the boundary allows with ``OUTPUT_TOO_DEEP``."""

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        max_concurrent_tools: int = 64,
        approval_timeout: float = 300.0,
        workspaces: Path = Path(".tierstack") / "workspaces",
        model: ModelProvider | None = None,
        store: ExecutionStore | None = None,
        max_output_bytes: int = Settings.max_output_bytes,
        workers: WorkerPool | None = None,
        owner: str = "",
    ) -> None:
        self.registry = registry
        self.owner = owner or f"execute-{uuid.uuid4().hex}"
        self.max_output_bytes = max_output_bytes
        self.workers = workers
        self.workspaces = workspaces
        self.store = store if store is not None else MemoryExecutionStore()
        self.approvals = Approvals(self.store, timeout=approval_timeout)
        self.monitor = ToolMonitor()
        self._server_slots = asyncio.Semaphore(max_concurrent_tools)
        self._flights: dict[str, _Flight] = {}
        self._memo: ByteBudgetLRU[tuple[str, str], tuple[float, common_pb2.ToolResult]] = ByteBudgetLRU(
            MEMO_BYTES, lambda memo: memo[1].ByteSize()
        )
        self.memo_hits = 0
        self.memo_misses = 0
        self.strategy_usage: Counter[str] = Counter()
        self._toolkits: LRUCache[tuple[str, ...], Toolkit] = LRUCache(TOOLKIT_CACHE_SIZE)
        self.model: ModelProvider = model if model is not None else LocalModel()
        self.strategies = StrategySelector()

    def context(
        self, request: common_pb2.RequestContext, limits: common_pb2.ResourceLimits | None = None
    ) -> ToolContext:
        """Returns what the calls of a request know of it; the calls of one run share a workspace."""
        return ToolContext(
            correlation_id=request.correlation_id,
            workspace_key=workspace_key(request),
            workspaces=self.workspaces,
            tenant=request.tenant_id,
            token_budget=(limits.max_tokens or None) if limits is not None else None,
        )

    async def call(
        self, tool: Tool, arguments: Mapping[str, Any], context: ToolContext, *, timeout: float | None = None
    ) -> common_pb2.ToolResult:
        """Runs one checked tool call; a failure of the tool is returned in the result's error."""
        start = time.perf_counter()
        tokens_before = context.meter.tokens
        result = common_pb2.ToolResult(tool=tool.name)
        # A caller may ask for less time than the tool's own limit, never for more: a day-long
        # timeout on a spinning template would hold a worker for the day.
        seconds = tool.timeout_seconds if timeout is None else min(timeout, tool.timeout_seconds)
        try:
            with span(f"tool {tool.name}"):
                async with asyncio.timeout(seconds):
                    value = await self._output(tool, dict(arguments), context, seconds)
            if (size := value.ByteSize()) > self.max_output_bytes:
                what = f"the output of {tool.name}"
                result.error.CopyFrom(output_too_large(_TIER, what, size, self.max_output_bytes, tool=tool.name))
            elif message_depth(value) > MAX_JSON_DEPTH:
                message = f"the output of {tool.name} nests deeper than {MAX_JSON_DEPTH} levels"
                result.error.CopyFrom(_error("OUTPUT_TOO_DEEP", message, tool=tool.name))
            else:
                result.output.CopyFrom(value)
        except ToolError as exc:
            result.error.CopyFrom(_error(exc.reason, brief(exc.message), tool=tool.name))
        except TimeoutError:
            result.error.CopyFrom(_error("TOOL_TIMEOUT", f"{tool.name} did not finish in time", tool=tool.name))
        except Exception:
            _log.exception("tool %s raised", tool.name)
            message = f"{tool.name} failed unexpectedly; the server's log has the details"
            result.error.CopyFrom(_error("TOOL_FAILED", message, tool=tool.name))
        elapsed = time.perf_counter() - start
        result.duration.CopyFrom(to_duration(elapsed))
        result.tokens = context.meter.tokens - tokens_before
        self.monitor.record(tool.name, elapsed, result.error if result.HasField("error") else None)
        return result

    async def _output(
        self, tool: Tool, arguments: dict[str, Any], context: ToolContext, seconds: float
    ) -> struct_pb2.Value:
        """Runs a tool where it belongs: its function in a worker process that ``seconds`` stop, its
        handler on the event loop."""
        if tool.function is None:
            assert tool.handler is not None  # a Tool has one or the other
            return to_value(await tool.handler(arguments, context))
        if self.workers is None:
            raise ToolError("WORKERS_UNAVAILABLE", f"{tool.name} runs in worker processes; this executor has none")
        return await self.workers.run(tool.function, arguments, context, timeout=seconds)

    async def execute_tool(self, request: executor_service_pb2.ExecuteToolRequest) -> common_pb2.ToolResult:
        """Checks and runs one tool call.

        Raises:
            InvalidArgumentError: The tool is unknown or its arguments break its schema.
        """
        arguments = from_struct(request.call.arguments)
        tool = _without_approval(self.registry.resolve(request.call.tool, arguments, field_prefix="call"))
        return await self.call(tool, arguments, self.context(request.context), timeout=to_seconds(request.timeout))

    async def execute_tools(
        self, request: executor_service_pb2.ExecuteToolsRequest
    ) -> AsyncIterator[executor_service_pb2.ToolBatchEvent]:
        """Runs independent tool calls at once, at most ``max_concurrency`` (4 by default) of this
        batch and ``max_concurrent_tools`` of the whole server, yielding each result as it finishes.
        Leaving early cancels the calls still running.

        Raises:
            InvalidArgumentError: A call names an unknown tool or breaks its tool's schema.
        """
        calls = []
        for index, call in enumerate(request.calls):
            arguments = from_struct(call.arguments)
            tool = self.registry.resolve(call.tool, arguments, field_prefix=f"calls[{index}]")
            calls.append((_without_approval(tool), arguments))
        timeout = to_seconds(request.timeout)
        batch_slots = asyncio.Semaphore(request.max_concurrency or 4)
        context = self.context(request.context)

        async def run(index: int, tool: Tool, arguments: dict[str, Any]) -> tuple[int, common_pb2.ToolResult]:
            async with batch_slots, self._server_slots:
                return index, await self.call(tool, arguments, context, timeout=timeout)

        tasks = [asyncio.create_task(run(index, tool, arguments)) for index, (tool, arguments) in enumerate(calls)]
        sequence = 0
        try:
            for next_done in asyncio.as_completed(tasks):
                index, result = await next_done
                sequence += 1
                yield executor_service_pb2.ToolBatchEvent(
                    sequence=sequence,
                    time=now_timestamp(),
                    correlation_id=request.context.correlation_id,
                    call_finished=executor_service_pb2.ToolCallFinished(index=index, result=result),
                )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def execute(self, request: executor_service_pb2.ExecuteRequest) -> Events:
        """Runs a step's tool calls in order (the deterministic strategy) and yields its events.
        The step's output is the last call's output; the first failing call fails the step.

        The execution id is an idempotency key: a step that ran to its end under the same id (kept in
        the execution store, across restarts) is not run again, its events are replayed; a call with
        the id of an execution still running joins it and sees the same events. Such a step runs in a
        task of the executor's own, so its caller leaving (a dropped stream, an orchestrator that
        died) does not stop it; :meth:`cancel_execution` does. The step's end is stored before it is
        sent. A step without an id belongs to its caller, who stops it by leaving.

        Without ``request.progress``, only the events a caller acts on are yielded (see
        :data:`ALWAYS_SENT`); every event is kept for a replay all the same.

        Raises:
            InvalidArgumentError: A call names an unknown tool or breaks its tool's schema.
            ResourceExhaustedError: ``MAX_FLIGHTS`` executions are in flight already.
        """
        async for event in self._events(request):
            if request.progress or event.WhichOneof("payload") in ALWAYS_SENT:
                yield event

    async def _events(self, request: executor_service_pb2.ExecuteRequest) -> Events:
        """Yields every event of an execution (see :meth:`execute`)."""
        if not request.execution_id:
            async for event in self._run(request):
                yield event
            return
        key = scoped(request.execution_id)  # one tenant's ids never meet another's
        flight = self._flights.get(key)
        if flight is None:
            if len(self._flights) >= MAX_FLIGHTS:
                raise ResourceExhaustedError(
                    [Violation("execution_id", f"{MAX_FLIGHTS} executions are in flight; try again later")],
                    reason="TOO_MANY_EXECUTIONS",
                )
            flight = self._flights[key] = _Flight()
            flight.task = asyncio.create_task(self._fly(request, key, flight), name="tierstack-execution")
        async for event in flight.follow():
            yield event

    async def _fly(self, request: executor_service_pb2.ExecuteRequest, key: str, flight: _Flight) -> None:
        """Runs (or replays) one execution into its flight, and keeps its end. On a store replicas
        share, an execution another replica runs now is not run here: its end is replayed once
        stored (or, should that replica die, it is run here once its claim's lease has passed)."""
        shared = self.store.shared  # one process: its flights are the only runners
        claimed = False
        try:
            stored = await self.store.finished(key)
            while shared and stored is None and not (claimed := await self.store.begin(key, self.owner)):
                await self.store.wait_changed(key, _ELSEWHERE_WAIT)
                if await self.store.cancels(key):
                    return  # stopped where it ran: the callers' streams end without its end
                stored = await self.store.finished(key)
            if claimed and stored is None:
                stored = await self.store.finished(key)  # finished elsewhere as it was claimed here
            if stored is not None:
                flight.extend(stored)
            else:
                async with self._holding(key) if claimed else contextlib.nullcontext():
                    async for event in self._run(request):
                        if event.WhichOneof("payload") in ("completed", "failed"):
                            await self.store.finish(key, [*flight.events, event])
                            claimed = False  # finishing gave the claim up
                        flight.extend([event])
            flight.end()
        except Exception as exc:  # a bad request (or a failing store): each caller gets it
            flight.end(exc)
        finally:
            flight.end()  # cancelled: the callers' streams end without the step's end
            if self._flights.get(key) is flight:
                del self._flights[key]
            if claimed:  # stopped without its end: free to run again, here or elsewhere
                await asyncio.shield(self._release(key))

    @contextlib.asynccontextmanager
    async def _holding(self, execution_id: str) -> AsyncIterator[None]:
        """Keeps this replica's claim of an execution alive while the block runs it, and cancels the
        block once a replica is asked to stop the execution. The guard that does so is stopped only
        while it waits, never in the middle of a query."""
        running = asyncio.current_task()
        assert running is not None  # called from a flight's task
        loop = asyncio.get_running_loop()
        every = self.store.lease_seconds / 3
        done = False
        waiting = False

        async def guard() -> None:
            nonlocal waiting
            renew_at = loop.time() + every
            while not done:
                waiting = True
                await self.store.wait_changed(stop_key(execution_id), max(renew_at - loop.time(), 0.0))
                waiting = False
                due = loop.time() >= renew_at
                if due:  # moved on first, so that a failing store is asked again a round later
                    renew_at = loop.time() + every
                with contextlib.suppress(Exception):  # the next round tries again
                    if await self.store.cancels(execution_id):
                        running.cancel()
                        return
                    if due:
                        await self.store.hold([execution_id], self.owner)

        guarding = asyncio.create_task(guard(), name="tierstack-execution-claim")
        try:
            yield
        finally:
            done = True
            if waiting:
                guarding.cancel()
            await asyncio.gather(guarding, return_exceptions=True)

    async def _release(self, execution_id: str) -> None:
        try:
            await self.store.release(execution_id, self.owner)
        except Exception as exc:  # its lease passes instead
            _log.warning("the claim of execution %s could not be given up (%s)", execution_id, type(exc).__name__)

    async def cancel_execution(self, execution_id: str) -> bool:
        """Cancels an execution in flight, here or (on a store replicas share) on the replica that
        runs it: its tool calls stop, its callers' streams end, and it is not kept, so that the same
        id runs it again; returns whether one was in flight (of the calling tenant's)."""
        execution_id = scoped(execution_id)
        flight = self._flights.get(execution_id)
        here = False
        if flight is not None and flight.task is not None and not flight.task.done():
            flight.task.cancel()
            here = True
        elsewhere = self.store.shared and await self.store.request_cancel(execution_id)
        return here or elsewhere

    async def close(self) -> None:
        """Cancels the executions in flight and waits for them to stop (they run again when asked for)."""
        tasks = [flight.task for flight in self._flights.values() if flight.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, request: executor_service_pb2.ExecuteRequest) -> Events:
        calls = []
        for index, call in enumerate(request.tool_calls):
            arguments = from_struct(call.arguments)
            calls.append((self.registry.resolve(call.tool, arguments, field_prefix=f"tool_calls[{index}]"), arguments))
        offered = self.toolkit(request, calls)
        limits = request.limits
        max_seconds = to_seconds(limits.max_duration)
        # Each tenant's track records are its own: another's must not replay its learnt tool calls.
        step_key = scoped(f"{request.step_id}|{hashlib.sha256(request.prompt.encode()).hexdigest()[:16]}")
        selection = self.strategies.select(
            step_key=step_key,
            requested=request.strategy,
            has_calls=bool(calls),
            sensitive=request.sensitive,
            max_seconds=max_seconds,
            max_credits=limits.max_credits,
            complexity=request.complexity,
        )
        if selection.chosen == DETERMINISTIC and not calls:
            if not selection.routine:
                why = "runs without a model, so it" if request.sensitive else "is deterministic: it"
                raise InvalidArgumentError([Violation("tool_calls", f"the step {why} needs its tool calls")])
            calls = [
                (self.registry.resolve(name, args, field_prefix="routine"), args) for name, args in selection.routine
            ]
        if selection.chosen != DETERMINISTIC and not request.prompt:
            raise InvalidArgumentError(
                [Violation("prompt", f"a {strategy_name(selection.chosen)} step needs a prompt")]
            )
        _reserve(limits, [tool for tool, _ in calls] if selection.chosen == DETERMINISTIC else [])
        step = _Step(self, request, max_seconds)
        yield step.event(
            started=executor_service_pb2.ExecutionStarted(
                step_id=request.step_id,
                strategy=selection.chosen,
                tool_call_count=len(calls) if selection.chosen == DETERMINISTIC else 0,
            )
        )
        yield step.event(
            strategy_selected=executor_service_pb2.StrategySelected(
                requested=selection.requested, chosen=selection.chosen, reason=selection.reason
            )
        )
        self.strategy_usage[strategy_name(selection.chosen)] += 1
        if selection.reason:
            _log.info("step %s runs %s: %s", request.step_id, strategy_name(selection.chosen), selection.reason)
        if selection.chosen == DETERMINISTIC:
            events = step.deterministic(calls)
        elif selection.chosen == CONVERSATIONAL:
            events = step.conversational(request.prompt, offered)
        else:
            events = step.reasoning(request.prompt, offered)
        async for event in events:
            yield event
        if step.error is None and (size := step.output.ByteSize()) > self.max_output_bytes:
            step.error = output_too_large(_TIER, "a step's output", size, self.max_output_bytes)
        self.strategies.record(step_key, selection.chosen).add(success=step.error is None, routine=step.routine)
        step.usage.duration.CopyFrom(to_duration(time.perf_counter() - step.start))
        if step.error is not None:
            yield step.event(failed=executor_service_pb2.ExecutionFailed(error=step.error, usage=step.usage))
            return
        _log.debug("step %s completed after %d tool calls", request.step_id, step.usage.tool_calls)
        yield step.event(output=executor_service_pb2.ExecutionOutput(value=step.output))
        yield step.event(completed=executor_service_pb2.ExecutionCompleted(usage=step.usage))

    def toolkit(
        self, request: executor_service_pb2.ExecuteRequest, calls: list[tuple[Tool, dict[str, Any]]]
    ) -> Toolkit:
        """Returns what a model-driven strategy offers the model in this step; kits are built once per
        set of tools and kept in a bounded LRU.

        Raises:
            InvalidArgumentError: ``tools`` names a tool that is not registered.
        """
        names = tuple(request.tools) or tuple(dict.fromkeys(tool.name for tool, _ in calls))
        kit = self._toolkits.get(names)
        if kit is not None:
            return kit
        tools = {}
        for index, tool_name in enumerate(names):
            found = self.registry.get(tool_name)
            if found is None:
                raise InvalidArgumentError([Violation(f"tools[{index}]", f"unknown tool {tool_name!r}")])
            tools[tool_name] = found
        kit = self._toolkits[names] = Toolkit(
            tools, tuple(ModelTool(t.name, t.description, t.parameters) for t in tools.values())
        )
        return kit

    def memoised(self, tool: Tool, arguments: dict[str, Any]) -> common_pb2.ToolResult | None:
        """Returns the remembered result of a pure tool's identical call, if it has not expired."""
        found = self._memo.get(_memo_key(tool, arguments))
        if found is None or found[0] < time.monotonic():
            self.memo_misses += 1
            return None
        self.memo_hits += 1
        return found[1]

    def memoise(self, tool: Tool, arguments: dict[str, Any], result: common_pb2.ToolResult) -> None:
        """Remembers a pure tool's successful result for ``MEMO_SECONDS``."""
        self._memo[_memo_key(tool, arguments)] = (time.monotonic() + MEMO_SECONDS, result)


def workspace_key(request: common_pb2.RequestContext) -> str:
    """Names the workspace of a request's calls. With auth on, the server derives it: the steps of a
    run (which a tier calls for) share the run's, any other caller's calls share one per correlation
    id, always within the caller's tenant, so no caller reaches a run's or another tenant's files by
    naming them. With auth off: the run the request names, else its correlation id."""
    principal = current_principal()
    if principal is None:
        return request.parent_execution_id or request.correlation_id
    if principal.role is Role.TIER and request.parent_execution_id:
        return namespaced(principal.tenant, f"run/{request.parent_execution_id}")
    return namespaced(principal.tenant, f"call/{request.correlation_id}")


def _memo_key(tool: Tool, arguments: dict[str, Any]) -> tuple[str, str]:
    """Returns the key of a pure call: the tool (in the caller's tenant) and a digest of its arguments
    (so keys stay small)."""
    return scoped(tool.name), hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()


class _Flight(Feed[executor_service_pb2.ExecutionEvent]):
    """An execution in flight: the events it has sent so far, for every call that follows it, and
    the task that runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.task: asyncio.Task[None] | None = None


class _Step:
    """One step being run: its events, usage and outcome, and the strategies that run it."""

    def __init__(
        self, executor: Executor, request: executor_service_pb2.ExecuteRequest, max_seconds: float | None
    ) -> None:
        self.executor = executor
        self.request = request
        self.context = executor.context(request.context, request.limits)
        self.event = _EventSequence(request.execution_id, request.context.correlation_id)
        # Names the step's approvals: an execution asked for again finds the ones it opened before.
        self.approval_key = scoped(request.execution_id or secrets.token_hex(16))
        self.start = time.perf_counter()
        self.deadline = None if max_seconds is None else self.start + max_seconds
        self.usage = common_pb2.ResourceUsage()
        self.output = to_value(None)
        self.error: common_pb2.ErrorDetail | None = None
        self.result = common_pb2.ToolResult()
        self.answer: Completion | None = None
        self.routine: Routine = ()
        self._calls = 0

    async def tool_call(self, tool: Tool, arguments: dict[str, Any]) -> Events:
        """Runs one call, asking for approval first when the tool needs it; leaves ``self.result``."""
        index = self._calls
        self._calls += 1
        rejection = None
        if tool.needs_approval:
            approvals = self.executor.approvals
            struct = to_struct(arguments)
            approval = await approvals.open(self.approval_key, index, tool.name, struct)
            waiting = executor_service_pb2.ApprovalRequired(
                index=index, tool=tool.name, approval_id=approval.approval_id, arguments=struct
            )
            waiting.expire_time.FromNanoseconds(approval.expire_ns)
            yield self.event(approval_required=waiting)
            rejection = await approvals.decision(approval)
        yield self.event(tool_call_started=executor_service_pb2.ToolCallStarted(index=index, tool=tool.name))
        if rejection is not None:
            message = f"{tool.name} was not approved: {rejection}"
            self.result = common_pb2.ToolResult(tool=tool.name, error=_error("TOOL_REJECTED", message))
        elif (remembered := self.executor.memoised(tool, arguments) if tool.pure else None) is not None:
            self.result = remembered
        else:
            for attempt in range(1, (CRITICAL_ATTEMPTS if tool.critical else 1) + 1):
                remaining = None if self.deadline is None else max(self.deadline - time.perf_counter(), 0.0)
                self.result = await self.executor.call(tool, arguments, self.context, timeout=remaining)
                self.usage.tool_calls += 1
                self.usage.credits += tool.credits
                self.usage.tokens += self.result.tokens
                if not self.result.HasField("error") or attempt == CRITICAL_ATTEMPTS or not tool.critical:
                    break
                if self._over(tool) is not None:  # a retry would pass the step's limits
                    break
                await asyncio.sleep(CRITICAL_BACKOFF_SECONDS * 2 ** (attempt - 1))
            if tool.pure and not self.result.HasField("error"):
                self.executor.memoise(tool, arguments, self.result)
        yield self.event(tool_call_finished=executor_service_pb2.ToolCallFinished(index=index, result=self.result))

    def _over(self, tool: Tool) -> common_pb2.ErrorDetail | None:
        """Returns why one more call of ``tool`` would pass the step's tool calls or credits, if it would."""
        limits = self.request.limits
        if limits.max_tool_calls and self.usage.tool_calls >= limits.max_tool_calls:
            return _error("TOOL_CALL_LIMIT", f"the step has made its {limits.max_tool_calls} tool calls")
        if limits.max_credits and self.usage.credits + tool.credits > limits.max_credits:
            left = limits.max_credits - self.usage.credits
            return _error(
                "CREDIT_BUDGET_EXHAUSTED",
                f"a call of {tool.name} costs {tool.credits:g} credits; the step has {left:g} of its credits left",
            )
        return None

    async def deterministic(self, calls: list[tuple[Tool, dict[str, Any]]]) -> Events:
        """Runs the step's tool calls as given; the first failure ends the step."""
        for tool, arguments in calls:
            async for event in self.tool_call(tool, arguments):
                yield event
            if self.result.HasField("error"):
                self.error = self.result.error
                return
            self.output = self.result.output

    async def _ask(self, phase: str, messages: list[Message], kit: Toolkit) -> Events:
        """Asks the model; leaves its answer in ``self.answer`` (None when it failed)."""
        self.answer = None
        limit = self.request.limits.max_tokens
        if limit and self.usage.tokens >= limit:
            self.error = _error("TOKEN_BUDGET_EXHAUSTED", f"the step has used its {limit} tokens")
            return
        credits = self.request.limits.max_credits
        if credits and self.usage.credits >= credits:
            self.error = _error("CREDIT_BUDGET_EXHAUSTED", f"the step has spent its {credits:g} credits")
            return
        request = CompletionRequest(
            messages=tuple(messages),
            tools=kit.model_tools,
            scope=Scope(  # the answer shrinks to fit what the step has left
                tenant=self.request.context.tenant_id,
                run=self.request.context.parent_execution_id or self.request.execution_id,
                token_budget=limit - self.usage.tokens if limit else None,
            ),
        )
        try:
            answer = await self.executor.model.complete(request)
        except ModelError as exc:
            self.error = _error(exc.reason, exc.message)
            return
        self.usage.tokens += answer.spent
        self.usage.credits += answer.cost
        self.context.meter.tokens += answer.spent  # what the tools the model calls may use shrinks with it
        self.answer = answer
        yield self.event(
            model_replied=executor_service_pb2.ModelReplied(
                phase=phase, content=answer.content, tool_calls=len(answer.tool_calls), tokens=answer.usage.total
            )
        )

    async def _answer_calls(self, answer: Completion, kit: Toolkit, messages: list[Message]) -> Events:
        """Runs the tool calls a model asked for and appends their results to the conversation; a bad
        call is answered with what is wrong, for the model to correct."""
        messages.append(Message("assistant", answer.content, tool_calls=answer.tool_calls))
        routine = list(self.routine)
        for call in answer.tool_calls:
            limit = self.request.limits.max_tool_calls or DEFAULT_MODEL_TOOL_CALLS
            if self.usage.tool_calls >= limit:
                self.error = _error("TOOL_CALL_LIMIT", f"the model asked for more than {limit} tool calls")
                return
            tool = kit.tools.get(call.name)
            if tool is not None and (over := self._over(tool)) is not None:
                self.error = over
                return
            problems = ["not offered to this step"] if tool is None else tool.violations(call.arguments, prefix="")
            if tool is None or problems:
                reply = f"error: {call.name} cannot run: " + "; ".join(str(p) for p in problems)
            else:
                async for event in self.tool_call(tool, call.arguments):
                    yield event
                if self.result.HasField("error"):
                    reply = f"error: {self.result.error.reason}: {self.result.error.message}"
                else:
                    reply = json.dumps(from_value(self.result.output))
                    routine.append((tool.name, call.arguments))
            messages.append(Message("tool", reply, tool_call_id=call.id))
        self.routine = tuple(routine)

    async def conversational(self, prompt: str, kit: Toolkit) -> Events:
        """A model/tool loop: the model calls tools until it answers; its answer is the output."""
        messages = [Message("system", CONVERSE), Message("user", prompt)]
        while self.error is None:
            async for event in self._ask("turn", messages, kit):
                yield event
            if self.answer is None:
                return
            if not self.answer.tool_calls:
                self.output = to_value(self.answer.content)
                return
            async for event in self._answer_calls(self.answer, kit, messages):
                yield event

    async def reasoning(self, prompt: str, kit: Toolkit) -> Events:
        """Analyse, plan (the plan is the tool calls the model asks for), execute, refine."""
        task = Message("user", prompt)
        async for event in self._ask("analyse", [Message("system", ANALYSE), task], _NO_TOOLS):
            yield event
        if self.answer is None:
            return
        analysis = Message("assistant", self.answer.content)
        messages = [Message("system", PLAN), task, analysis]
        async for event in self._ask("plan", messages, kit):
            yield event
        if self.answer is None:
            return
        async for event in self._answer_calls(self.answer, kit, messages):
            yield event
        if self.error is not None:
            return
        messages[0] = Message("system", REFINE)
        async for event in self._ask("refine", messages, _NO_TOOLS):
            yield event
        if self.answer is not None:
            self.output = to_value(self.answer.content)


def _reserve(limits: common_pb2.ResourceLimits, tools: list[Tool]) -> None:
    """Reserves a step's budget before anything runs: the deterministic strategy knows every call.

    Raises:
        ResourceExhaustedError: The calls would spend more tool calls or credits than allotted.
    """
    over = []
    if limits.max_tool_calls and len(tools) > limits.max_tool_calls:
        over.append(
            Violation("max_tool_calls", f"the step makes {len(tools)} tool calls; it may make {limits.max_tool_calls}")
        )
    credits = sum(tool.credits for tool in tools)
    if limits.max_credits and credits > limits.max_credits:
        over.append(
            Violation("max_credits", f"the step's calls cost {credits:g} credits; it may spend {limits.max_credits:g}")
        )
    if over:
        raise ResourceExhaustedError(over, reason="STEP_BUDGET_EXCEEDED")


def _without_approval(tool: Tool) -> Tool:
    """Refuses a tool that needs approval outside a step, where nobody could be asked.

    Raises:
        FailedPreconditionError: The tool needs approval.
    """
    if tool.needs_approval:
        raise FailedPreconditionError(
            f"{tool.name} needs approval: run it in a step (Execute), whose stream asks for it",
            reason="APPROVAL_REQUIRED",
            metadata={"tool": tool.name},
        )
    return tool
