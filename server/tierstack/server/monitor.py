"""MonitorService: the metrics of the tier a server runs; on Coordinate also those of the other tiers,
their alerts and recommendations."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from tierstack.core.errors import FailedPreconditionError, InvalidArgumentError, Violation
from tierstack.core.values import to_seconds
from tierstack.server.crosstier import CrossTierMonitor, Snapshot
from tierstack.v1 import common_pb2, monitor_service_pb2_grpc
from tierstack.v1 import monitor_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]
#: The shortest interval between metric snapshots, in seconds.
MIN_WATCH_INTERVAL = 0.1


class MonitorServicer(monitor_service_pb2_grpc.MonitorServiceServicer):
    """Serves a tier's metrics, and with a cross-tier monitor those of all three, alerts and advice.

    Args:
        tier: The server's tier.
        snapshot: Returns the server's own metrics for a method filter.
        cross_tier: The cross-tier monitor, on Coordinate; None elsewhere.
    """

    def __init__(
        self, tier: common_pb2.Tier.ValueType, snapshot: Snapshot, cross_tier: CrossTierMonitor | None
    ) -> None:
        self._tier = tier
        self._snapshot = snapshot
        self._cross_tier = cross_tier

    async def _gather(self, tiers: Sequence[common_pb2.Tier.ValueType], method_filter: str) -> list[pb.TierMetrics]:
        if not tiers or set(tiers) == {self._tier}:
            return [self._snapshot(method_filter)]
        if self._cross_tier is None:
            raise InvalidArgumentError(
                [
                    Violation(f"tiers[{i}]", "this server reports only its own tier; ask Coordinate for the others")
                    for i, tier in enumerate(tiers)
                    if tier != self._tier
                ]
            )
        unknown = [
            Violation(f"tiers[{i}]", "is not a tier") for i, t in enumerate(tiers) if t not in self._cross_tier.tiers
        ]
        if unknown:
            raise InvalidArgumentError(unknown)
        return await self._cross_tier.all_metrics(tiers, method_filter)

    def _needs_cross_tier(self) -> CrossTierMonitor:
        if self._cross_tier is None:
            raise FailedPreconditionError(
                "alerts and recommendations are served by Coordinate, which watches all tiers"
            )
        return self._cross_tier

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Context) -> pb.GetMetricsResponse:
        return pb.GetMetricsResponse(tiers=await self._gather(request.tiers, request.method_filter))

    async def WatchMetrics(
        self, request: pb.WatchMetricsRequest, context: Context
    ) -> AsyncIterator[pb.WatchMetricsResponse]:
        interval = to_seconds(request.interval) if request.HasField("interval") else None
        interval = interval if interval is not None and interval >= MIN_WATCH_INTERVAL else 1.0
        while True:
            tiers = await self._gather(request.tiers, request.method_filter)
            alerts = self._cross_tier.active_alerts() if self._cross_tier is not None else []
            yield pb.WatchMetricsResponse(tiers=tiers, active_alerts=alerts)
            await asyncio.sleep(interval)

    async def WatchAlerts(
        self, request: pb.WatchAlertsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAlertsResponse]:
        async with contextlib.aclosing(self._needs_cross_tier().alerts()) as alerts:  # unsubscribes on leaving
            async for alert in alerts:
                yield pb.WatchAlertsResponse(alert=alert)

    async def GetRecommendations(
        self, request: pb.GetRecommendationsRequest, context: Context
    ) -> pb.GetRecommendationsResponse:
        return pb.GetRecommendationsResponse(recommendations=await self._needs_cross_tier().recommendations())
