"""The executor: runs tool calls and steps, producing the events of the wire contract."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from tierstack.client.values import from_struct, now_timestamp, to_duration, to_struct, to_value
from tierstack.server.errors import FailedPreconditionError, ResourceExhaustedError, Violation, error_detail
from tierstack.server.execute.approvals import Approvals
from tierstack.server.execute.monitor import ToolMonitor
from tierstack.server.execute.registry import Tool, ToolContext, ToolError, ToolRegistry
from tierstack.v1 import common_pb2, executor_service_pb2

_log = logging.getLogger(__name__)
_error = functools.partial(error_detail, common_pb2.TIER_EXECUTE)


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
    call runs, so a malformed step fails as a whole without side effects."""

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        remembered: int = 10_000,
        max_concurrent_tools: int = 64,
        approval_timeout: float = 300.0,
        workspaces: Path = Path(".tierstack") / "workspaces",
    ) -> None:
        self.registry = registry
        self.workspaces = workspaces
        self.approvals = Approvals(timeout=approval_timeout)
        self.monitor = ToolMonitor()
        self._server_slots = asyncio.Semaphore(max_concurrent_tools)
        self._remembered = remembered
        self._finished: OrderedDict[str, list[executor_service_pb2.ExecutionEvent]] = OrderedDict()

    def context(self, request: common_pb2.RequestContext) -> ToolContext:
        """Returns what the calls of a request know of it; the calls of one run share a workspace."""
        return ToolContext(
            correlation_id=request.correlation_id,
            workspace_key=request.parent_execution_id or request.correlation_id,
            workspaces=self.workspaces,
        )

    async def call(
        self, tool: Tool, arguments: Mapping[str, Any], context: ToolContext, *, timeout: float | None = None
    ) -> common_pb2.ToolResult:
        """Runs one checked tool call; a failure of the tool is returned in the result's error."""
        start = time.perf_counter()
        tokens_before = context.meter.tokens
        result = common_pb2.ToolResult(tool=tool.name)
        try:
            async with asyncio.timeout(tool.timeout_seconds if timeout is None else timeout):
                output = await tool.handler(dict(arguments), context)
            result.output.CopyFrom(to_value(output))
        except ToolError as exc:
            result.error.CopyFrom(_error(exc.reason, exc.message, tool=tool.name))
        except TimeoutError:
            result.error.CopyFrom(_error("TOOL_TIMEOUT", f"{tool.name} did not finish in time", tool=tool.name))
        except Exception as exc:
            _log.exception("tool %s raised", tool.name)
            result.error.CopyFrom(
                _error("TOOL_FAILED", f"{tool.name} raised {type(exc).__name__}: {exc}", tool=tool.name)
            )
        elapsed = time.perf_counter() - start
        result.duration.CopyFrom(to_duration(elapsed))
        result.tokens = context.meter.tokens - tokens_before
        self.monitor.record(tool.name, elapsed, result.error if result.HasField("error") else None)
        return result

    async def execute_tool(self, request: executor_service_pb2.ExecuteToolRequest) -> common_pb2.ToolResult:
        """Checks and runs one tool call.

        Raises:
            InvalidArgumentError: The tool is unknown or its arguments break its schema.
        """
        arguments = from_struct(request.call.arguments)
        tool = _without_approval(self.registry.resolve(request.call.tool, arguments, field_prefix="call"))
        timeout_ns = request.timeout.ToNanoseconds()
        context = self.context(request.context)
        return await self.call(tool, arguments, context, timeout=timeout_ns / 1e9 if timeout_ns > 0 else None)

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
        timeout_ns = request.timeout.ToNanoseconds()
        timeout = timeout_ns / 1e9 if timeout_ns > 0 else None
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

    async def execute(
        self, request: executor_service_pb2.ExecuteRequest
    ) -> AsyncIterator[executor_service_pb2.ExecutionEvent]:
        """Runs a step's tool calls in order (the deterministic strategy) and yields its events.
        The step's output is the last call's output; the first failing call fails the step.

        The execution id is an idempotency key: a step that already ran to its end under the same id
        (among the last ``remembered``) is not run again; its events are replayed.

        Raises:
            InvalidArgumentError: A call names an unknown tool or breaks its tool's schema.
        """
        key = request.execution_id
        if key and key in self._finished:
            self._finished.move_to_end(key)
            for event in self._finished[key]:
                yield event
            return
        events: list[executor_service_pb2.ExecutionEvent] = []
        async for event in self._run(request):
            events.append(event)
            yield event
        if key and events[-1].WhichOneof("payload") in ("completed", "failed"):
            self._finished[key] = events
            if len(self._finished) > self._remembered:
                self._finished.popitem(last=False)

    async def _run(
        self, request: executor_service_pb2.ExecuteRequest
    ) -> AsyncIterator[executor_service_pb2.ExecutionEvent]:
        calls = []
        for index, call in enumerate(request.tool_calls):
            arguments = from_struct(call.arguments)
            calls.append((self.registry.resolve(call.tool, arguments, field_prefix=f"tool_calls[{index}]"), arguments))
        _reserve(request.limits, [tool for tool, _ in calls])
        context = self.context(request.context)
        event = _EventSequence(request.execution_id, request.context.correlation_id)
        start = time.perf_counter()
        usage = common_pb2.ResourceUsage()
        yield event(
            started=executor_service_pb2.ExecutionStarted(
                step_id=request.step_id,
                # The model-driven strategies are not built yet: every step runs deterministically, and
                # the event says so whatever the request asked for.
                strategy=common_pb2.STRATEGY_DETERMINISTIC,
                tool_call_count=len(calls),
            )
        )
        limits = request.limits
        deadline = start + limits.max_duration.ToNanoseconds() / 1e9 if limits.HasField("max_duration") else None
        output = to_value(None)
        for index, (tool, arguments) in enumerate(calls):
            rejection = None
            if tool.needs_approval:
                approval_id, expires = self.approvals.open(tool.name)
                waiting = executor_service_pb2.ApprovalRequired(
                    index=index, tool=tool.name, approval_id=approval_id, arguments=to_struct(arguments)
                )
                waiting.expire_time.FromNanoseconds(expires)
                yield event(approval_required=waiting)
                rejection = await self.approvals.decision(approval_id)
            if rejection is None:
                yield event(tool_call_started=executor_service_pb2.ToolCallStarted(index=index, tool=tool.name))
                remaining = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
                result = await self.call(tool, arguments, context, timeout=remaining)
                usage.tool_calls += 1
                usage.credits += tool.credits
                usage.tokens += result.tokens
            else:
                result = common_pb2.ToolResult(
                    tool=tool.name, error=_error("TOOL_REJECTED", f"{tool.name} was not approved: {rejection}")
                )
            yield event(tool_call_finished=executor_service_pb2.ToolCallFinished(index=index, result=result))
            if result.HasField("error"):
                usage.duration.CopyFrom(to_duration(time.perf_counter() - start))
                yield event(failed=executor_service_pb2.ExecutionFailed(error=result.error, usage=usage))
                return
            output = result.output
        usage.duration.CopyFrom(to_duration(time.perf_counter() - start))
        _log.debug("step %s completed after %d tool calls", request.step_id, usage.tool_calls)
        yield event(output=executor_service_pb2.ExecutionOutput(value=output))
        yield event(completed=executor_service_pb2.ExecutionCompleted(usage=usage))


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
