"""CoordinatorService: the thin gRPC face of the coordinator (Tier 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tierstack.client import OrchestratorClient
from tierstack.server import correlation
from tierstack.server.config import Settings
from tierstack.server.coordinate.decompose import LocalProvider
from tierstack.server.coordinate.engine import Coordinator, team_for, team_message
from tierstack.v1 import common_pb2, coordinator_service_pb2_grpc
from tierstack.v1 import coordinator_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]


class CoordinatorServicer(coordinator_service_pb2_grpc.CoordinatorServiceServicer):
    """Translates CoordinatorService calls into coordinator calls."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def Coordinate(self, request: pb.CoordinateRequest, context: Context) -> AsyncIterator[pb.CoordinateResponse]:
        correlation.bind(request.context)
        async for event in self._coordinator.coordinate(request):
            yield pb.CoordinateResponse(event=event)

    async def DecomposeGoal(self, request: pb.DecomposeGoalRequest, context: Context) -> pb.DecomposeGoalResponse:
        correlation.bind(request.context)
        return self._coordinator.decompose(request.goal, request.agents)

    async def FormTeam(self, request: pb.FormTeamRequest, context: Context) -> pb.FormTeamResponse:
        formed = team_message(team_for(request.agents, request.subtasks))
        return pb.FormTeamResponse(assignments=formed.assignments, unassigned_subtask_ids=formed.unassigned_subtask_ids)


class CoordinateService:
    """Tier 1 as a server component: the local provider, an Orchestrate client and the coordinator."""

    tier = common_pb2.TIER_COORDINATE
    service_names: tuple[str, ...] = (pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,)

    def __init__(self, settings: Settings) -> None:
        self._orchestrator = OrchestratorClient(settings.orchestrate_target)
        self.coordinator = Coordinator(self._orchestrator, LocalProvider())

    def register(self, server: grpc.aio.Server) -> None:
        coordinator_service_pb2_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(self.coordinator), server
        )

    async def start(self) -> None:
        """Nothing runs in the background of Tier 1."""

    def stopping(self) -> None:
        """Nothing to prepare: goals in flight end with their callers' streams."""

    async def close(self) -> None:
        await self._orchestrator.close()
