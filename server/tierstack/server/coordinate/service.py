"""CoordinatorService: the thin gRPC face of the coordinator (Tier 1)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from tierstack.server import correlation
from tierstack.server.advice import AdviceThresholds
from tierstack.server.ai import AIService, Scope
from tierstack.server.ai.service import LOCAL
from tierstack.server.auth.guard import on_behalf
from tierstack.server.config import Settings
from tierstack.server.coordinate.decompose import LocalProvider
from tierstack.server.coordinate.decomposer import Decomposer
from tierstack.server.coordinate.engine import Coordinator, team_message
from tierstack.server.coordinate.memory import GoalMemory
from tierstack.server.coordinate.model_decomposer import ModelDecomposer
from tierstack.server.coordinate.postgres_store import PostgresGoalStore
from tierstack.server.coordinate.similarity import EmbeddingIndex, NgramIndex
from tierstack.server.coordinate.store import GoalStore, SqliteGoalStore
from tierstack.server.coordinate.templates import BUILTIN_TEMPLATES, load_templates
from tierstack.server.coordinate.tier2 import Orchestrator
from tierstack.server.crosstier import CrossTierMonitor
from tierstack.server.interceptor import CarriedCalls, tier_channel
from tierstack.server.metrics import MethodMetrics
from tierstack.server.pagination import decode_time_cursor, encode_time_cursor
from tierstack.v1 import common_pb2, coordinator_service_pb2_grpc
from tierstack.v1 import coordinator_service_pb2 as pb
from tierstack.v1 import monitor_service_pb2 as monitor_pb

Context = grpc.aio.ServicerContext[Any, Any]


class CoordinatorServicer(coordinator_service_pb2_grpc.CoordinatorServiceServicer):
    """Translates CoordinatorService calls into coordinator calls."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def Coordinate(self, request: pb.CoordinateRequest, context: Context) -> AsyncIterator[pb.CoordinateResponse]:
        correlation.bind(request.context)
        async for event in self._coordinator.coordinate(request):
            yield pb.CoordinateResponse(event=event)

    async def StartGoal(self, request: pb.StartGoalRequest, context: Context) -> pb.StartGoalResponse:
        correlation.bind(request.context)
        goal, created = await self._coordinator.start_goal(request)
        return pb.StartGoalResponse(goal=goal, created=created)

    async def GetGoal(self, request: pb.GetGoalRequest, context: Context) -> pb.GetGoalResponse:
        return pb.GetGoalResponse(goal=await self._coordinator.get_goal(request.goal_id))

    async def WatchGoal(self, request: pb.WatchGoalRequest, context: Context) -> AsyncIterator[pb.WatchGoalResponse]:
        async for event in self._coordinator.watch(request.goal_id, after_sequence=request.after_sequence):
            yield pb.WatchGoalResponse(event=event)

    async def ListGoals(self, request: pb.ListGoalsRequest, context: Context) -> pb.ListGoalsResponse:
        size = request.page_size or 50
        after = decode_time_cursor(request.page_token)
        goals = await self._coordinator.list_goals(limit=size + 1, after=after, state=request.state)
        page = goals[:size]
        last = page[-1] if page else None
        more = last is not None and len(goals) > size
        token = encode_time_cursor(last.create_time.ToNanoseconds(), last.goal_id) if last and more else ""
        return pb.ListGoalsResponse(goals=page, next_page_token=token)

    async def CancelGoal(self, request: pb.CancelGoalRequest, context: Context) -> pb.CancelGoalResponse:
        return pb.CancelGoalResponse(goal=await self._coordinator.cancel_goal(request.goal_id, request.reason))

    async def DecomposeGoal(self, request: pb.DecomposeGoalRequest, context: Context) -> pb.DecomposeGoalResponse:
        correlation.bind(request.context)
        scope = Scope(tenant=request.context.tenant_id)
        return await self._coordinator.decomposer.decompose(request.goal, request.agents, scope)

    async def FormTeam(self, request: pb.FormTeamRequest, context: Context) -> pb.FormTeamResponse:
        team = await self._coordinator.form_team(
            request.agents, request.subtasks, max_parallelism=request.max_parallelism
        )
        formed = team_message(team)
        return pb.FormTeamResponse(assignments=formed.assignments, unassigned_subtask_ids=formed.unassigned_subtask_ids)


class CoordinateService:
    """Tier 1 as a server component: the AI service, the decomposer (goal memory, templates, then the
    model when one is configured, else the local rules), an Orchestrate client, the goal store (which
    keeps the goal memory too) and the coordinator."""

    tier = common_pb2.TIER_COORDINATE
    service_names: tuple[str, ...] = (pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,)

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.client_metrics = MethodMetrics()
        self._channel = tier_channel(
            settings.orchestrate_target,
            self.client_metrics,
            max_message_bytes=settings.max_message_bytes,
            tls=settings.tls_below,
            tier_key=settings.tier_key,
        )
        self._orchestrator = Orchestrator(
            self._channel, self.client_metrics, max_message_bytes=settings.max_message_bytes
        )
        self.cross_tier = CrossTierMonitor(
            self.tier,
            {
                common_pb2.TIER_ORCHESTRATE: settings.orchestrate_target,
                common_pb2.TIER_EXECUTE: settings.execute_target,
            },
            interval=settings.monitor_interval_seconds,
            thresholds=settings.alert_thresholds,
            advice=AdviceThresholds(
                tool_seconds=settings.slow_tool_seconds, window_seconds=settings.advice_window_seconds
            ),
            max_message_bytes=settings.max_message_bytes,
            tls=settings.tls_below,
            metadata=on_behalf(None, settings.tier_key) if settings.tier_key else (),
        )
        if settings.embedding_model and not settings.model_base_url:
            raise ValueError("TIERSTACK_EMBEDDING_MODEL needs TIERSTACK_MODEL_BASE_URL: the model API that embeds")
        self.ai = AIService.from_settings(settings)
        index = (
            EmbeddingIndex(functools.partial(self.ai.embed, model=settings.embedding_model))
            if settings.embedding_model
            else NgramIndex()
        )
        lease = settings.lease_seconds
        self._store: GoalStore = (
            PostgresGoalStore(settings.postgres_url, lease_seconds=lease)
            if settings.postgres_url
            else SqliteGoalStore.in_folder(settings.sqlite_dir, lease_seconds=lease)
        )
        self._memory = GoalMemory(self._store, index=index, max_entries=settings.goal_memory_entries)
        provider = ModelDecomposer(self.ai) if settings.model != LOCAL else LocalProvider()
        decomposer = Decomposer(memory=self._memory, provider=provider, threshold=settings.similarity_threshold)
        self.coordinator = Coordinator(
            self._orchestrator,
            decomposer,
            store=self._store,
            owner=settings.replica_id,
            max_output_bytes=settings.max_total_output_bytes,
            tenant_goals=settings.tenant_concurrent_goals,
        )

    def fill_metrics(self, metrics: monitor_pb.TierMetrics, method_filter: str) -> None:
        """Adds the model calls, decomposition time by source, team formation time and active goals,
        and the calls to Orchestrate."""
        coordinator = self.coordinator
        metrics.client_methods.extend(self.client_metrics.messages(method_filter))
        metrics.coordinate.CopyFrom(
            monitor_pb.CoordinateMetrics(
                model=self.ai.metrics(),
                decomposition_latency={k: h.stats() for k, h in coordinator.decomposition_latency.items()},
                team_formation_latency=coordinator.team_formation_latency.stats(),
                active_goals=coordinator.active_goals,
            )
        )

    def register(self, server: grpc.aio.Server, carried: CarriedCalls) -> None:
        coordinator_service_pb2_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(self.coordinator), server
        )

    async def start(self, health: Callable[[bool], Awaitable[None]], ports: Collection[int]) -> None:
        """Loads the goal templates (the built-in ones, then the user's) and the learnt goals, then
        takes up the goals a previous process left unfinished."""
        folders = [BUILTIN_TEMPLATES, *([self._settings.templates_dir] if self._settings.templates_dir else [])]
        self.coordinator.decomposer.templates = tuple(await asyncio.to_thread(load_templates, folders))
        await self._store.open()
        await self._memory.load()
        await self.coordinator.open()
        await self.cross_tier.start()

    def stopping(self) -> None:
        """Marks the coordinator as stopping: goals in flight stay unfinished, to resume on the next
        start, and callers leaving no longer cancel goals."""
        self.coordinator.stopping()

    async def close(self) -> None:
        await self.coordinator.close()
        await self.cross_tier.close()
        await self._orchestrator.close()
        await self._channel.close()
        await self._store.close()
        await self.ai.close()
