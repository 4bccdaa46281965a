"""ExecutorService: the thin gRPC face of the executor (Tier 3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from tierstack.core.values import to_duration, to_struct
from tierstack.server import correlation
from tierstack.server.ai import AIService
from tierstack.server.config import Settings
from tierstack.server.execute.builtin import HttpRequester, register_builtin_tools
from tierstack.server.execute.engine import Executor
from tierstack.server.execute.mcp_tools import McpMounts, McpServer
from tierstack.server.execute.postgres_store import PostgresExecutionStore
from tierstack.server.execute.python_tools import register_entry_point_tools
from tierstack.server.execute.registry import ToolRegistry, ToolSource
from tierstack.server.execute.store import ExecutionStore, SqliteExecutionStore
from tierstack.server.execute.stream import execute_streams
from tierstack.server.execute.workers import WorkerPool
from tierstack.server.execute.workspaces import remove_stale
from tierstack.server.interceptor import CarriedCalls
from tierstack.server.multiplex import Multiplexer
from tierstack.server.pagination import decode_token, encode_token
from tierstack.server.retention import Sweeper
from tierstack.v1 import common_pb2, executor_service_pb2, executor_service_pb2_grpc
from tierstack.v1 import monitor_service_pb2 as monitor_pb

_SOURCES = {
    ToolSource.BUILTIN: executor_service_pb2.TOOL_SOURCE_BUILTIN,
    ToolSource.PYTHON: executor_service_pb2.TOOL_SOURCE_PYTHON,
    ToolSource.MCP: executor_service_pb2.TOOL_SOURCE_MCP,
}


class ExecutorServicer(executor_service_pb2_grpc.ExecutorServiceServicer):
    """Translates ExecutorService calls into executor calls."""

    def __init__(self, executor: Executor, streams: Multiplexer, *, slow_tool_seconds: float) -> None:
        self._executor = executor
        self._streams = streams
        self._slow_tool_seconds = slow_tool_seconds

    async def Execute(
        self, request: executor_service_pb2.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[executor_service_pb2.ExecuteResponse]:
        correlation.bind(request.context)
        async for event in self._executor.execute(request):
            yield executor_service_pb2.ExecuteResponse(event=event)

    async def CancelExecution(
        self, request: executor_service_pb2.CancelExecutionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_service_pb2.CancelExecutionResponse:
        cancelled = await self._executor.cancel_execution(request.execution_id)
        return executor_service_pb2.CancelExecutionResponse(cancelled=cancelled)

    async def ExecuteTool(
        self, request: executor_service_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_service_pb2.ExecuteToolResponse:
        correlation.bind(request.context)
        return executor_service_pb2.ExecuteToolResponse(result=await self._executor.execute_tool(request))

    async def ExecuteTools(
        self, request: executor_service_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[executor_service_pb2.ExecuteToolsResponse]:
        correlation.bind(request.context)
        async for event in self._executor.execute_tools(request):
            yield executor_service_pb2.ExecuteToolsResponse(event=event)

    async def GetToolStats(
        self, request: executor_service_pb2.GetToolStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_service_pb2.GetToolStatsResponse:
        threshold_ns = request.slow_threshold.ToNanoseconds()
        threshold = threshold_ns / 1e9 if threshold_ns > 0 else self._slow_tool_seconds
        monitor = self._executor.monitor
        return executor_service_pb2.GetToolStatsResponse(
            tools=[
                executor_service_pb2.ToolStats(
                    tool=tool,
                    calls=record.latency.count,
                    failures=record.failures,
                    average=to_duration(record.average),
                    p50=to_duration(record.latency.percentile(0.50)),
                    p95=to_duration(record.latency.percentile(0.95)),
                    p99=to_duration(record.latency.percentile(0.99)),
                    p999=to_duration(record.latency.percentile(0.999)),
                    last_error=record.last_error,
                )
                for tool, record in monitor.records().items()
            ],
            slow_tools=monitor.slow(threshold),
            slow_threshold=to_duration(threshold),
        )

    async def ApproveToolCall(
        self, request: executor_service_pb2.ApproveToolCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_service_pb2.ApproveToolCallResponse:
        tool = await self._executor.approvals.approve(request.approval_id)
        return executor_service_pb2.ApproveToolCallResponse(tool=tool)

    async def RejectToolCall(
        self, request: executor_service_pb2.RejectToolCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_service_pb2.RejectToolCallResponse:
        tool = await self._executor.approvals.reject(request.approval_id, request.reason)
        return executor_service_pb2.RejectToolCallResponse(tool=tool)

    async def ExecuteStream(
        self,
        request_iterator: AsyncIterator[executor_service_pb2.ExecuteStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[executor_service_pb2.ExecuteStreamResponse]:
        async for answer in self._streams.serve(request_iterator, context):
            yield answer

    async def ListTools(
        self, request: executor_service_pb2.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_service_pb2.ListToolsResponse:
        size = request.page_size or 100
        after = decode_token(request.page_token)
        tools = [tool for tool in self._executor.registry.tools() if tool.name > after]
        page = tools[:size]
        return executor_service_pb2.ListToolsResponse(
            tools=[
                executor_service_pb2.ToolDescriptor(
                    name=tool.name,
                    description=tool.description,
                    parameters_schema=to_struct(tool.parameters),
                    source=_SOURCES[tool.source],
                )
                for tool in page
            ],
            next_page_token=encode_token(page[-1].name) if len(tools) > size else "",
        )


class ExecuteService:
    """Tier 3 as a server component: the registry of built-in tools, the executor over it and the
    worker processes its CPU-heavy tools run in."""

    tier = common_pb2.TIER_EXECUTE
    service_names: tuple[str, ...] = (executor_service_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name,)

    def __init__(self, settings: Settings) -> None:
        self._http = HttpRequester(
            settings.http_allowed_hosts, allowed_networks=settings.http_allowed_networks, tier_ports=settings.tier_ports
        )
        self.ai = AIService.from_settings(settings)
        self.registry = ToolRegistry()
        register_builtin_tools(self.registry, self._http, self.ai)
        self._mcp = McpMounts(McpServer.parse(settings.mcp_servers))
        register_entry_point_tools(self.registry)
        budget = settings.execution_store_bytes
        self._store: ExecutionStore = (
            PostgresExecutionStore(settings.postgres_url, max_bytes=budget, lease_seconds=settings.lease_seconds)
            if settings.postgres_url
            else SqliteExecutionStore.in_folder(settings.sqlite_dir, max_bytes=budget)
        )
        self.workers = WorkerPool(
            workers=settings.worker_processes,
            memory_mb=settings.worker_memory_mb,
            max_output_bytes=settings.max_output_bytes,
        )
        self.executor = Executor(
            self.registry,
            max_concurrent_tools=settings.max_concurrent_tools,
            approval_timeout=settings.approval_timeout_seconds,
            workspaces=settings.data_dir / "workspaces",
            model=self.ai,
            store=self._store,
            max_output_bytes=settings.max_output_bytes,
            workers=self.workers,
            owner=settings.replica_id,
        )
        self._slow_tool_seconds = settings.slow_tool_seconds
        self._streams: Multiplexer | None = None
        self._max_message_bytes = settings.max_message_bytes
        self._retention = Sweeper("workspaces and executions", settings.retention_seconds, self._forget)

    async def _forget(self, before: float) -> None:
        """Removes the workspaces unused since ``before`` and forgets the executions finished before."""
        await asyncio.to_thread(remove_stale, self.executor.workspaces, before)
        await self._store.forget_before(round(before * 1e9))

    cross_tier = None

    def fill_metrics(self, metrics: monitor_pb.TierMetrics, method_filter: str) -> None:
        """Adds per-tool latency and failures, strategy usage, the result cache and the model calls."""
        executor = self.executor
        metrics.execute.CopyFrom(
            monitor_pb.ExecuteMetrics(
                tools=[
                    monitor_pb.ToolMetrics(name=name, failures=record.failures, latency=record.latency.stats())
                    for name, record in executor.monitor.records().items()
                ],
                strategy_usage=executor.strategy_usage,
                result_cache_hits=executor.memo_hits,
                result_cache_misses=executor.memo_misses,
                model=self.ai.metrics(),
            )
        )

    def register(self, server: grpc.aio.Server, carried: CarriedCalls) -> None:
        self._streams = execute_streams(self.executor, carried, max_message_bytes=self._max_message_bytes)
        executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(
            ExecutorServicer(self.executor, self._streams, slow_tool_seconds=self._slow_tool_seconds), server
        )

    async def start(self, health: Callable[[bool], Awaitable[None]], ports: Collection[int]) -> None:
        """Opens the execution store, starts the tool worker processes, mounts the configured MCP
        servers' tools and starts removing workspaces once their retention has passed; tools never
        reach ``ports``."""
        self._http.refuse_ports(ports)
        await self._store.open()
        await self.workers.start()
        await self._mcp.start(self.registry)
        self._retention.start()

    def stopping(self) -> None:
        """Ends each ExecuteStream once its calls in flight have ended, refusing new steps meanwhile;
        other calls in flight finish or are cancelled with the server."""
        if self._streams is not None:
            self._streams.stop()

    async def close(self) -> None:
        await self._retention.close()
        await self.executor.close()
        await self._mcp.close()
        await self._store.close()
        await self._http.aclose()
        await self.ai.close()
        await self.workers.close()
