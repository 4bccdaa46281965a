"""OrchestratorService: the thin gRPC face of the run manager (Tier 2)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any, TypeVar

import grpc

from tierstack.client import ExecutorClient
from tierstack.core.errors import FailedPreconditionError, InvalidArgumentError, Violation, quoted
from tierstack.core.values import to_duration, to_value
from tierstack.server import correlation
from tierstack.server.config import Settings
from tierstack.server.interceptor import CarriedCalls, tier_channel
from tierstack.server.metrics import MethodMetrics
from tierstack.server.multiplex import WATCH_RUN, Kind, Multiplexer
from tierstack.server.orchestrate.engine import RunManager
from tierstack.server.orchestrate.persistence import HealthReport
from tierstack.server.orchestrate.postgres_store import PostgresRunStore
from tierstack.server.orchestrate.store import RunStore, SqliteRunStore
from tierstack.server.orchestrate.tier3 import ExecuteStreams
from tierstack.server.pagination import decode_time_cursor, encode_time_cursor
from tierstack.v1 import common_pb2, orchestrator_service_pb2_grpc
from tierstack.v1 import monitor_service_pb2 as monitor_pb
from tierstack.v1 import orchestrator_service_pb2 as pb
from tierstack.v1.executor_service_pb2 import ListToolsRequest

Context = grpc.aio.ServicerContext[Any, Any]
#: A response that carries the run its call acted on.
ActedOn = TypeVar("ActedOn", pb.StartRunResponse, pb.CancelRunResponse, pb.PauseRunResponse, pb.ResumeRunResponse)


def _basic(run: pb.Run) -> pb.Run:
    """Returns a copy of ``run`` without its inputs, its outputs and its steps' outputs."""
    basic = pb.Run()
    basic.CopyFrom(run)
    basic.ClearField("inputs")
    basic.ClearField("outputs")
    for step in basic.steps:
        step.ClearField("output")
    return basic


class OrchestratorServicer(orchestrator_service_pb2_grpc.OrchestratorServiceServicer):
    """Translates OrchestratorService calls into run manager calls."""

    def __init__(self, manager: RunManager, streams: Multiplexer, *, max_message_bytes: int) -> None:
        self._manager = manager
        self._streams = streams
        self._max_message_bytes = max_message_bytes

    def _fitted(self, response: ActedOn) -> ActedOn:
        """Returns ``response``, its run in the basic view when the full one would not fit a message:
        the call has acted by then, so it is not refused."""
        if response.ByteSize() > self._max_message_bytes:
            response.run.CopyFrom(_basic(response.run))
        return response

    def _fitting(self, response: pb.GetRunResponse | pb.ListRunsResponse, instead: str) -> None:
        """Refuses a response in the full view that one message cannot carry; ``instead`` says what to
        ask for.

        Raises:
            FailedPreconditionError: It is larger than the largest message.
        """
        size = response.ByteSize()
        if size > self._max_message_bytes:
            raise FailedPreconditionError(
                f"the full view is {size} bytes, more than the {self._max_message_bytes} bytes of a message; "
                f"ask for {instead}",
                reason="RUN_TOO_LARGE",
                metadata={"max_bytes": str(self._max_message_bytes)},
            )

    async def Orchestrate(
        self, request: pb.OrchestrateRequest, context: Context
    ) -> AsyncIterator[pb.OrchestrateResponse]:
        run, _ = await self._start(request)
        ended = False
        try:
            async for event in self._manager.watch(run.run_id):
                yield pb.OrchestrateResponse(event=event)
            ended = True
        finally:
            if not ended:  # the caller went away: a run it can no longer see must not go on
                self._manager.request_cancel(run.run_id, "the caller of Orchestrate went away")

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        run, created = await self._start(request, request.request_id)
        return self._fitted(pb.StartRunResponse(run=run, created=created))

    async def _start(
        self, request: pb.OrchestrateRequest | pb.StartRunRequest, request_id: str = ""
    ) -> tuple[pb.Run, bool]:
        correlation.bind(request.context)
        return await self._manager.start_run(
            workflow=request.workflow,
            inputs=request.inputs,
            limits=request.limits,
            context=request.context,
            request_id=request_id,
            durability=request.durability,
            verbosity=request.verbosity,
        )

    async def WatchRun(self, request: pb.WatchRunRequest, context: Context) -> AsyncIterator[pb.WatchRunResponse]:
        async for event in _watched(self._manager, request):
            yield pb.WatchRunResponse(event=event)

    async def WatchRuns(
        self, request_iterator: AsyncIterator[pb.WatchRunsRequest], context: Context
    ) -> AsyncIterator[pb.WatchRunsResponse]:
        async for answer in self._streams.serve(request_iterator, context):
            yield answer

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        run = await self._manager.get_run(request.run_id)
        if request.view == pb.RUN_VIEW_BASIC:
            return pb.GetRunResponse(run=_basic(run))
        response = pb.GetRunResponse(run=run)
        self._fitting(response, "RUN_VIEW_BASIC (WatchRun's events carry the outputs)")
        return response

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        size = request.page_size or 50
        runs = await self._manager.list_runs(
            limit=size + 1, after=decode_time_cursor(request.page_token), state=request.state
        )
        page = runs[:size]
        last = page[-1] if page else None
        token = encode_time_cursor(last.create_time.ToNanoseconds(), last.run_id) if last and len(runs) > size else ""
        if request.view != pb.RUN_VIEW_FULL:
            return pb.ListRunsResponse(runs=[_basic(run) for run in page], next_page_token=token)
        response = pb.ListRunsResponse(runs=page, next_page_token=token)
        self._fitting(response, "RUN_VIEW_BASIC or a smaller page_size")
        return response

    async def CancelRun(self, request: pb.CancelRunRequest, context: Context) -> pb.CancelRunResponse:
        return self._fitted(pb.CancelRunResponse(run=await self._manager.cancel_run(request.run_id, request.reason)))

    async def DeleteRun(self, request: pb.DeleteRunRequest, context: Context) -> pb.DeleteRunResponse:
        await self._manager.delete_run(request.run_id)
        return pb.DeleteRunResponse()

    async def PauseRun(self, request: pb.PauseRunRequest, context: Context) -> pb.PauseRunResponse:
        return self._fitted(pb.PauseRunResponse(run=await self._manager.pause_run(request.run_id, request.reason)))

    async def ResumeRun(self, request: pb.ResumeRunRequest, context: Context) -> pb.ResumeRunResponse:
        return self._fitted(pb.ResumeRunResponse(run=await self._manager.resume_run(request.run_id)))

    async def ResolveVariables(
        self, request: pb.ResolveVariablesRequest, context: Context
    ) -> pb.ResolveVariablesResponse:
        values = await self._manager.resolve(request.run_id, request.expressions)
        return pb.ResolveVariablesResponse(values=[to_value(value) for value in values])

    async def PlanWorkflow(self, request: pb.PlanWorkflowRequest, context: Context) -> pb.PlanWorkflowResponse:
        spec = await self._manager.spec(request.workflow)
        plan, cached = self._manager.planner.plan(spec)
        return pb.PlanWorkflowResponse(
            cached=cached,
            plan=pb.Plan(
                batches=[pb.PlanBatch(step_ids=batch) for batch in plan.batches],
                estimated_duration=to_duration(plan.estimated_seconds),
                max_parallelism=plan.max_parallelism,
                critical_path=plan.critical_path,
                workflow_hash=spec.content_hash,
            ),
        )

    async def ValidateWorkflow(
        self, request: pb.ValidateWorkflowRequest, context: Context
    ) -> pb.ValidateWorkflowResponse:
        try:
            await self._manager.check(request.workflow)
        except InvalidArgumentError as exc:
            return pb.ValidateWorkflowResponse(
                valid=False,
                violations=[
                    common_pb2.FieldViolation(field=v.field, description=v.description) for v in exc.violations
                ],
            )
        return pb.ValidateWorkflowResponse(valid=True)


class ToolNames:
    """The names of the tools Tier 3 offers, asked of it at most once per ``ttl`` seconds."""

    def __init__(self, executor: ExecutorClient, *, ttl: float = 5.0) -> None:
        self._executor = executor
        self._ttl = ttl
        self._names: frozenset[str] = frozenset()
        self._fetched = float("-inf")

    async def __call__(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._fetched > self._ttl:
            names: set[str] = set()
            token = ""
            while True:
                page = await self._executor.list_tools(ListToolsRequest(page_size=1000, page_token=token))
                names.update(tool.name for tool in page.tools)
                token = page.next_page_token
                if not token:
                    break
            self._names, self._fetched = frozenset(names), now
        return self._names


class OrchestrateService:
    """Tier 2 as a server component: a run store, an Execute client and the run manager.

    Args:
        settings: The server's settings.
        store: Where runs are kept; the one ``settings.store_url`` names unless given.
    """

    tier = common_pb2.TIER_ORCHESTRATE
    service_names: tuple[str, ...] = (pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,)

    def __init__(self, settings: Settings, *, store: RunStore | None = None) -> None:
        if store is None:
            url = settings.postgres_url
            lease = settings.lease_seconds
            store = (
                PostgresRunStore(url, lease_seconds=lease)
                if url
                else SqliteRunStore.in_folder(settings.sqlite_dir, lease_seconds=lease)
            )
        self._store = store
        self.client_metrics = MethodMetrics()
        self._max_message_bytes = settings.max_message_bytes
        self._channel = tier_channel(
            settings.execute_target,
            self.client_metrics,
            max_message_bytes=settings.max_message_bytes,
            tls=settings.tls_below,
            tier_key=settings.tier_key,
        )
        self._streams = ExecuteStreams(self._channel, self.client_metrics, max_message_bytes=settings.max_message_bytes)
        self._watches: Multiplexer | None = None
        self.manager = RunManager(
            self._store,
            self._streams,
            tools=ToolNames(ExecutorClient(channel=self._channel)),
            max_output_bytes=settings.max_output_bytes,
            max_total_output_bytes=settings.max_total_output_bytes,
            max_message_bytes=settings.max_message_bytes,
            retention=settings.retention_seconds,
            owner=settings.replica_id,
            tenant_runs=settings.tenant_concurrent_runs,
        )

    cross_tier = None

    def fill_metrics(self, metrics: monitor_pb.TierMetrics, method_filter: str) -> None:
        """Adds runs by state, step latency, context operations, queue depth, persistence (and whether
        the store fails) and plans, and the calls to Execute."""
        manager = self.manager
        flushes = manager.log.stats
        metrics.client_methods.extend(self.client_metrics.messages(method_filter))
        metrics.orchestrate.CopyFrom(
            monitor_pb.OrchestrateMetrics(
                runs_by_state=manager.runs_by_state(),
                step_latency=manager.step_latency.stats(),
                context_operations_per_second=manager.context_operations.rate(),
                queue_depth=manager.queued_steps,
                flush_latency=flushes.latency.stats(),
                mean_flush_batch_size=flushes.mean_batch,
                plan_cache_hits=manager.planner.hits,
                plan_cache_misses=manager.planner.misses,
                store_failing=manager.log.failing,
                store_write_failures=flushes.failures,
                store_write_age=to_duration(flushes.write_age),
                queued_events=manager.log.queued,
            )
        )

    def register(self, server: grpc.aio.Server, carried: CarriedCalls) -> None:
        manager = self.manager

        async def watch(number: int, request: pb.WatchRunRequest) -> AsyncIterator[pb.WatchRunsResponse]:
            async for event in _watched(manager, request):
                yield pb.WatchRunsResponse(call=number, event=event)

        kinds = {"watch": Kind(WATCH_RUN, watch, refused_when_stopping=True)}
        self._watches = Multiplexer(
            pb.WatchRunsRequest, pb.WatchRunsResponse, kinds, carried, max_message_bytes=self._max_message_bytes
        )
        orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(
            OrchestratorServicer(manager, self._watches, max_message_bytes=self._max_message_bytes), server
        )

    async def start(self, health: HealthReport, ports: Collection[int]) -> None:
        """Opens the store and resumes the runs it holds; while writes to it fail, ``health`` is told."""
        self.manager.log.report_health(health)
        await self._store.open()
        await self.manager.open()

    def stopping(self) -> None:
        self.manager.stopping()
        if self._watches is not None:
            self._watches.stop()

    async def close(self) -> None:
        await self.manager.close()
        await self._streams.close()
        await self._channel.close()
        await self._store.close()


async def _watched(manager: RunManager, request: pb.WatchRunRequest) -> AsyncIterator[pb.RunEvent]:
    """Yields the events a WatchRun call asks for."""
    kinds = _kinds(request.kinds)
    async for event in manager.watch(request.run_id, after_sequence=request.after_sequence):
        if not kinds or event.WhichOneof("payload") in kinds:
            yield event


_EVENT_KINDS = frozenset(field.name for field in pb.RunEvent.DESCRIPTOR.oneofs_by_name["payload"].fields)


def _kinds(names: Sequence[str]) -> frozenset[str]:
    """Returns the kinds of run event a watcher asks for.

    Raises:
        InvalidArgumentError: A name is no kind of run event.
    """
    unknown = [
        Violation(f"kinds[{i}]", f"{quoted(name, 40)} is no kind of run event")
        for i, name in enumerate(names)
        if name not in _EVENT_KINDS
    ]
    if unknown:
        raise InvalidArgumentError(unknown)
    return frozenset(names)
