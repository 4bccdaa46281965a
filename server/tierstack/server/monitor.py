"""MonitorService: the metrics of the tier a server runs."""

from __future__ import annotations

from typing import Any

import grpc

from tierstack.client.values import now_timestamp, to_duration
from tierstack.server.metrics import MethodMetrics
from tierstack.v1 import common_pb2, monitor_service_pb2, monitor_service_pb2_grpc


class MonitorServicer(monitor_service_pb2_grpc.MonitorServiceServicer):
    """Serves the latency percentiles and status counts the interceptor recorded."""

    def __init__(self, tier: common_pb2.Tier.ValueType, metrics: MethodMetrics) -> None:
        self._tier = tier
        self._metrics = metrics

    async def GetMetrics(
        self, request: monitor_service_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> monitor_service_pb2.GetMetricsResponse:
        return monitor_service_pb2.GetMetricsResponse(
            tier=self._tier,
            collect_time=now_timestamp(),
            methods=[
                monitor_service_pb2.MethodMetrics(
                    method=s.method,
                    count=s.count,
                    counts_by_code=s.counts_by_code,
                    p50=to_duration(s.p50),
                    p95=to_duration(s.p95),
                    p99=to_duration(s.p99),
                    max=to_duration(s.max),
                )
                for s in self._metrics.summaries(request.method_filter)
            ],
        )
