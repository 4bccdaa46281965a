"""Async clients, one per service. Each is an async context manager that owns its channel unless
given one, applies a default deadline to unary calls, and raises :class:`TierstackError`s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from tierstack.client.defaults import DEFAULT_MAX_MESSAGE_BYTES
from tierstack.client.errors import translate_errors
from tierstack.client.tls import Tls
from tierstack.core.values import JSON, from_value, to_duration
from tierstack.v1 import common_pb2
from tierstack.v1 import coordinator_service_pb2 as coordinator_pb2
from tierstack.v1 import coordinator_service_pb2_grpc as coordinator_grpc
from tierstack.v1 import executor_service_pb2 as executor_pb2
from tierstack.v1 import executor_service_pb2_grpc as executor_grpc
from tierstack.v1 import monitor_service_pb2 as monitor_pb2
from tierstack.v1 import monitor_service_pb2_grpc as monitor_grpc
from tierstack.v1 import orchestrator_service_pb2 as orchestrator_pb2
from tierstack.v1 import orchestrator_service_pb2_grpc as orchestrator_grpc

Metadata = Sequence[tuple[str, str]]


# Calls to replicas are spread over those whose health service says SERVING, by gRPC itself.
_BALANCED = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})


def open_channel(
    target: str, *, max_message_bytes: int, interceptors: Sequence[Any] = (), tls: Tls | None = None
) -> grpc.aio.Channel:
    """Returns a channel to ``target`` that sends and receives messages of up to ``max_message_bytes``,
    over TLS when ``tls`` is given, else in plaintext.

    ``target`` is one ``host:port``; several, comma-separated (IP addresses: ``10.0.0.1:50052,10.0.0.2:50052``);
    or any gRPC name, such as ``dns:///orchestrate.internal:50052`` for every address a DNS name has.
    Calls to several replicas are balanced round-robin over those whose health check answers SERVING.
    """
    several = "," in target and ":///" not in target
    if several and not target.startswith(("ipv4:", "ipv6:")):
        target = ("ipv6:" if "[" in target else "ipv4:") + target
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # While calls are open (long-lived streams too), the server is pinged each minute, so that a
        # connection that died without a word is found within 80 s.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),  # a stream quiet for long is pinged all the same
    ]
    if several or target.startswith("dns:"):
        options.append(("grpc.service_config", _BALANCED))
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors)


class _Client:
    """Owns (or borrows) a channel and carries the call defaults shared by every client.

    Args:
        target: The server address, such as ``127.0.0.1:50053``, or several replicas' (see
            :func:`open_channel`); ignored when ``channel`` is given.
        channel: A channel to share; the client then leaves closing it to its owner.
        timeout: The default deadline of unary calls, in seconds; streams have none unless given.
        metadata: Metadata sent with every call.
        max_message_bytes: The largest message the channel the client opens sends or receives; the
            servers' default unless told otherwise (ignored when ``channel`` is given).
        tls: TLS for the channel the client opens (see :class:`Tls`); plaintext when None.
        api_key: The API key sent with every call (``authorization: Bearer …``), for servers with
            authentication on.
    """

    def __init__(
        self,
        target: str = "",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 30.0,
        metadata: Metadata = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: Tls | None = None,
        api_key: str = "",
    ) -> None:
        if channel is None and not target:
            raise ValueError("give a target or a channel")
        if api_key and not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
            raise ValueError("an API key is printable ASCII without spaces")
        self._owns_channel = channel is None
        self.channel = (
            channel if channel is not None else open_channel(target, max_message_bytes=max_message_bytes, tls=tls)
        )
        self.timeout = timeout
        self.metadata = (*metadata, *((("authorization", f"Bearer {api_key}"),) if api_key else ()))

    async def close(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _options(self, timeout: float | None, default: float | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else default, "metadata": self.metadata}

    async def _responses(self, call: grpc.aio.UnaryStreamCall[Any, Any]) -> AsyncIterator[Any]:
        """Yields each streamed response; leaving early cancels the call."""
        try:
            with translate_errors():
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def _stream(self, call: grpc.aio.UnaryStreamCall[Any, Any]) -> AsyncIterator[Any]:
        """Yields the ``event`` of each streamed response; leaving early cancels the call."""
        async for response in self._responses(call):
            yield response.event


class ExecutorClient(_Client):
    """Calls ExecutorService (Tier 3)."""

    def __init__(self, target: str = "", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = executor_grpc.ExecutorServiceStub(self.channel)

    def execute(
        self, request: executor_pb2.ExecuteRequest, *, timeout: float | None = None
    ) -> AsyncIterator[executor_pb2.ExecutionEvent]:
        """Runs one step and yields its events."""
        return self._stream(self._stub.Execute(request, **self._options(timeout, None)))

    async def cancel_execution(self, execution_id: str, *, timeout: float | None = None) -> bool:
        """Cancels a step in flight (Execute keeps running one whose caller left); returns whether
        it was in flight."""
        with translate_errors():
            response = await self._stub.CancelExecution(
                executor_pb2.CancelExecutionRequest(execution_id=execution_id), **self._options(timeout, self.timeout)
            )
        return response.cancelled

    async def execute_tool(
        self, request: executor_pb2.ExecuteToolRequest, *, timeout: float | None = None
    ) -> executor_pb2.ExecuteToolResponse:
        """Runs one tool call."""
        with translate_errors():
            return await self._stub.ExecuteTool(request, **self._options(timeout, self.timeout))

    def execute_tools(
        self, request: executor_pb2.ExecuteToolsRequest, *, timeout: float | None = None
    ) -> AsyncIterator[executor_pb2.ToolBatchEvent]:
        """Runs a batch of independent tool calls and yields each result as it finishes."""
        return self._stream(self._stub.ExecuteTools(request, **self._options(timeout, None)))

    async def get_tool_stats(
        self, *, slow_threshold: float = 0.0, timeout: float | None = None
    ) -> executor_pb2.GetToolStatsResponse:
        """Returns every tool's calls, failures and latency percentiles, and the slow tools."""
        request = executor_pb2.GetToolStatsRequest()
        if slow_threshold:
            request.slow_threshold.FromNanoseconds(round(slow_threshold * 1e9))
        with translate_errors():
            return await self._stub.GetToolStats(request, **self._options(timeout, self.timeout))

    async def approve_tool_call(
        self, approval_id: str, *, approver: str = "", timeout: float | None = None
    ) -> executor_pb2.ApproveToolCallResponse:
        """Lets a tool call that waits for approval run."""
        with translate_errors():
            return await self._stub.ApproveToolCall(
                executor_pb2.ApproveToolCallRequest(approval_id=approval_id, approver=approver),
                **self._options(timeout, self.timeout),
            )

    async def reject_tool_call(
        self, approval_id: str, *, reason: str = "", timeout: float | None = None
    ) -> executor_pb2.RejectToolCallResponse:
        """Rejects a tool call that waits for approval; its step fails."""
        with translate_errors():
            return await self._stub.RejectToolCall(
                executor_pb2.RejectToolCallRequest(approval_id=approval_id, reason=reason),
                **self._options(timeout, self.timeout),
            )

    async def list_tools(
        self, request: executor_pb2.ListToolsRequest | None = None, *, timeout: float | None = None
    ) -> executor_pb2.ListToolsResponse:
        """Returns a page of registered tools."""
        with translate_errors():
            return await self._stub.ListTools(
                request or executor_pb2.ListToolsRequest(), **self._options(timeout, self.timeout)
            )


class OrchestratorClient(_Client):
    """Calls OrchestratorService (Tier 2)."""

    def __init__(self, target: str = "", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = orchestrator_grpc.OrchestratorServiceStub(self.channel)

    def orchestrate(
        self, request: orchestrator_pb2.OrchestrateRequest, *, timeout: float | None = None
    ) -> AsyncIterator[orchestrator_pb2.RunEvent]:
        """Runs a workflow and yields its events until the run ends."""
        return self._stream(self._stub.Orchestrate(request, **self._options(timeout, None)))

    async def start_run(
        self, request: orchestrator_pb2.StartRunRequest, *, timeout: float | None = None
    ) -> orchestrator_pb2.StartRunResponse:
        """Starts a run and returns at once."""
        with translate_errors():
            return await self._stub.StartRun(request, **self._options(timeout, self.timeout))

    def watch_run(
        self, run_id: str, *, after_sequence: int = 0, kinds: Sequence[str] = (), timeout: float | None = None
    ) -> AsyncIterator[orchestrator_pb2.RunEvent]:
        """Yields a run's events after ``after_sequence``: history first, then live until the run ends;
        only those of ``kinds`` (RunEvent's payload names, such as ``"step_completed"``) when given."""
        request = orchestrator_pb2.WatchRunRequest(run_id=run_id, after_sequence=after_sequence, kinds=kinds)
        return self._stream(self._stub.WatchRun(request, **self._options(timeout, None)))

    async def get_run(
        self,
        run_id: str,
        *,
        view: orchestrator_pb2.RunView.ValueType = orchestrator_pb2.RUN_VIEW_FULL,
        timeout: float | None = None,
    ) -> orchestrator_pb2.Run:
        """Returns one run; ``RUN_VIEW_BASIC`` leaves out its inputs and outputs, and always fits a message.

        Raises:
            FailedPreconditionError: The full run is larger than a message (reason ``RUN_TOO_LARGE``).
        """
        with translate_errors():
            response = await self._stub.GetRun(
                orchestrator_pb2.GetRunRequest(run_id=run_id, view=view), **self._options(timeout, self.timeout)
            )
        return response.run

    async def list_runs(
        self, request: orchestrator_pb2.ListRunsRequest | None = None, *, timeout: float | None = None
    ) -> orchestrator_pb2.ListRunsResponse:
        """Returns a page of runs, newest first, in the view ``request.view`` names (basic unless full)."""
        with translate_errors():
            return await self._stub.ListRuns(
                request or orchestrator_pb2.ListRunsRequest(), **self._options(timeout, self.timeout)
            )

    async def cancel_run(self, run_id: str, *, reason: str = "", timeout: float | None = None) -> orchestrator_pb2.Run:
        """Cancels a run and returns it."""
        with translate_errors():
            response = await self._stub.CancelRun(
                orchestrator_pb2.CancelRunRequest(run_id=run_id, reason=reason),
                **self._options(timeout, self.timeout),
            )
        return response.run

    async def delete_run(self, run_id: str, *, timeout: float | None = None) -> None:
        """Deletes a finished run and its events (FailedPreconditionError for a run that has not ended)."""
        with translate_errors():
            await self._stub.DeleteRun(
                orchestrator_pb2.DeleteRunRequest(run_id=run_id), **self._options(timeout, self.timeout)
            )

    async def pause_run(self, run_id: str, *, reason: str = "", timeout: float | None = None) -> orchestrator_pb2.Run:
        """Pauses a run (steps in flight are cancelled and run again on resume) and returns it."""
        with translate_errors():
            response = await self._stub.PauseRun(
                orchestrator_pb2.PauseRunRequest(run_id=run_id, reason=reason), **self._options(timeout, self.timeout)
            )
        return response.run

    async def resume_run(self, run_id: str, *, timeout: float | None = None) -> orchestrator_pb2.Run:
        """Resumes a paused run and returns it."""
        with translate_errors():
            response = await self._stub.ResumeRun(
                orchestrator_pb2.ResumeRunRequest(run_id=run_id), **self._options(timeout, self.timeout)
            )
        return response.run

    async def resolve_variables(
        self, run_id: str, expressions: Sequence[str], *, timeout: float | None = None
    ) -> list[JSON]:
        """Resolves template expressions (``inputs.x``, ``steps.a.output.y``, ``vars.z``) in a run's context."""
        with translate_errors():
            response = await self._stub.ResolveVariables(
                orchestrator_pb2.ResolveVariablesRequest(run_id=run_id, expressions=expressions),
                **self._options(timeout, self.timeout),
            )
        return [from_value(value) for value in response.values]

    async def plan_workflow(
        self, workflow: orchestrator_pb2.Workflow, *, timeout: float | None = None
    ) -> orchestrator_pb2.PlanWorkflowResponse:
        """Plans a workflow into parallel batches."""
        with translate_errors():
            return await self._stub.PlanWorkflow(
                orchestrator_pb2.PlanWorkflowRequest(workflow=workflow),
                **self._options(timeout, self.timeout),
            )

    async def validate_workflow(
        self, workflow: orchestrator_pb2.Workflow, *, timeout: float | None = None
    ) -> orchestrator_pb2.ValidateWorkflowResponse:
        """Checks a workflow and returns every problem found."""
        with translate_errors():
            return await self._stub.ValidateWorkflow(
                orchestrator_pb2.ValidateWorkflowRequest(workflow=workflow),
                **self._options(timeout, self.timeout),
            )


class CoordinatorClient(_Client):
    """Calls CoordinatorService (Tier 1)."""

    def __init__(self, target: str = "", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = coordinator_grpc.CoordinatorServiceStub(self.channel)

    def coordinate(
        self, request: coordinator_pb2.CoordinateRequest, *, timeout: float | None = None
    ) -> AsyncIterator[coordinator_pb2.GoalEvent]:
        """Starts a goal and yields its events, including those of the tiers below, until it ends.
        Leaving early leaves the goal running unless the request sets ``cancel_on_disconnect``."""
        return self._stream(self._stub.Coordinate(request, **self._options(timeout, None)))

    async def start_goal(
        self, request: coordinator_pb2.StartGoalRequest, *, timeout: float | None = None
    ) -> coordinator_pb2.StartGoalResponse:
        """Starts a goal and returns at once; a ``request_id`` already seen returns the goal it started."""
        with translate_errors():
            return await self._stub.StartGoal(request, **self._options(timeout, self.timeout))

    def watch_goal(
        self, goal_id: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[coordinator_pb2.GoalEvent]:
        """Yields a goal's events after ``after_sequence``: history first, then live until the goal ends."""
        request = coordinator_pb2.WatchGoalRequest(goal_id=goal_id, after_sequence=after_sequence)
        return self._stream(self._stub.WatchGoal(request, **self._options(timeout, None)))

    async def get_goal(self, goal_id: str, *, timeout: float | None = None) -> coordinator_pb2.Goal:
        """Returns one goal."""
        with translate_errors():
            response = await self._stub.GetGoal(
                coordinator_pb2.GetGoalRequest(goal_id=goal_id), **self._options(timeout, self.timeout)
            )
        return response.goal

    async def list_goals(
        self, request: coordinator_pb2.ListGoalsRequest | None = None, *, timeout: float | None = None
    ) -> coordinator_pb2.ListGoalsResponse:
        """Returns a page of goals, newest first."""
        with translate_errors():
            return await self._stub.ListGoals(
                request or coordinator_pb2.ListGoalsRequest(), **self._options(timeout, self.timeout)
            )

    async def cancel_goal(
        self, goal_id: str, *, reason: str = "", timeout: float | None = None
    ) -> coordinator_pb2.Goal:
        """Cancels a goal and the runs of its subtasks, and returns it."""
        with translate_errors():
            response = await self._stub.CancelGoal(
                coordinator_pb2.CancelGoalRequest(goal_id=goal_id, reason=reason),
                **self._options(timeout, self.timeout),
            )
        return response.goal

    async def decompose_goal(
        self, request: coordinator_pb2.DecomposeGoalRequest, *, timeout: float | None = None
    ) -> coordinator_pb2.DecomposeGoalResponse:
        """Splits a goal into subtasks."""
        with translate_errors():
            return await self._stub.DecomposeGoal(request, **self._options(timeout, self.timeout))

    async def form_team(
        self, request: coordinator_pb2.FormTeamRequest, *, timeout: float | None = None
    ) -> coordinator_pb2.FormTeamResponse:
        """Assigns subtasks to agents."""
        with translate_errors():
            return await self._stub.FormTeam(request, **self._options(timeout, self.timeout))


class MonitorClient(_Client):
    """Calls MonitorService, which every tierstack server serves."""

    def __init__(self, target: str = "", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = monitor_grpc.MonitorServiceStub(self.channel)

    async def get_metrics(
        self,
        method_filter: str = "",
        *,
        tiers: Sequence[common_pb2.Tier.ValueType] = (),
        timeout: float | None = None,
    ) -> monitor_pb2.GetMetricsResponse:
        """Returns the metrics of the server's tier, or (from Coordinate) of ``tiers``."""
        with translate_errors():
            return await self._stub.GetMetrics(
                monitor_pb2.GetMetricsRequest(method_filter=method_filter, tiers=tiers),
                **self._options(timeout, self.timeout),
            )

    async def watch_metrics(
        self, interval: float = 1.0, *, tiers: Sequence[common_pb2.Tier.ValueType] = (), method_filter: str = ""
    ) -> AsyncIterator[monitor_pb2.WatchMetricsResponse]:
        """Yields a snapshot of the metrics every ``interval`` seconds, with the active alerts."""
        request = monitor_pb2.WatchMetricsRequest(
            interval=to_duration(interval), tiers=tiers, method_filter=method_filter
        )
        async for response in self._responses(self._stub.WatchMetrics(request, metadata=self.metadata)):
            yield response

    async def watch_alerts(self) -> AsyncIterator[monitor_pb2.Alert]:
        """Yields the active alerts, then each alert raised or resolved, each with the recommendation that
        answers it (Coordinate only)."""
        call = self._stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(), metadata=self.metadata)
        async for response in self._responses(call):
            yield response.alert

    async def get_recommendations(self, *, timeout: float | None = None) -> list[monitor_pb2.Recommendation]:
        """Returns advice on what to improve, judged on the recent window, with its estimated impact and
        effort: the highest priority first, then the largest impact (Coordinate only)."""
        with translate_errors():
            response = await self._stub.GetRecommendations(
                monitor_pb2.GetRecommendationsRequest(), **self._options(timeout, self.timeout)
            )
        return list(response.recommendations)
