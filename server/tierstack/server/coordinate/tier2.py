"""How Coordinate reaches Orchestrate: runs started, read and cancelled by calls of their own, and
followed over a few long-lived WatchRuns calls, each carrying many runs' watches at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from tierstack.client import OrchestratorClient
from tierstack.core.errors import InternalError
from tierstack.server.metrics import MethodMetrics
from tierstack.server.multiplex import WATCH_RUN, Multiplexed
from tierstack.v1 import orchestrator_service_pb2 as pb
from tierstack.v1 import orchestrator_service_pb2_grpc

#: How many streams of watches are kept open to Orchestrate.
DEFAULT_STREAMS = 2


class Orchestrator:
    """Starts, watches and cancels Tier 2 runs (a ``WorkflowRunner``).

    Args:
        channel: The channel to Orchestrate (whose interceptors add the tier's key).
        metrics: Where each watch is recorded, per method and status code, as calls of their own are.
        max_message_bytes: The largest message the channel sends.
        streams: How many streams of watches are kept open.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metrics: MethodMetrics,
        *,
        max_message_bytes: int,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        self._client = OrchestratorClient(channel=channel)
        stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
        self._watches = Multiplexed(stub.WatchRuns, metrics, streams=streams, max_message_bytes=max_message_bytes)

    async def start_run(self, request: pb.StartRunRequest) -> pb.StartRunResponse:
        return await self._client.start_run(request)

    async def watch_run(self, run_id: str, *, after_sequence: int = 0) -> AsyncIterator[pb.RunEvent]:
        """Yields a run's events after ``after_sequence`` until it ends or pauses."""
        watch = pb.WatchRunRequest(run_id=run_id, after_sequence=after_sequence)
        async with self._watches.call(WATCH_RUN, pb.WatchRunsRequest(watch=watch)) as call:
            async for answer in call:
                if not answer.HasField("event"):
                    raise InternalError("Orchestrate answered a watch with something other than an event")
                yield answer.event

    async def get_run(self, run_id: str) -> pb.Run:
        return await self._client.get_run(run_id)

    async def cancel_run(self, run_id: str, *, reason: str = "") -> pb.Run:
        return await self._client.cancel_run(run_id, reason=reason)

    async def close(self) -> None:
        """Closes the streams of watches."""
        await self._watches.close()
