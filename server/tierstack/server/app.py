"""Runs one tier as a grpc.aio server with health, reflection, metrics and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tierstack.client.defaults import DEFAULT_MAX_MESSAGE_BYTES
from tierstack.core.values import now_timestamp
from tierstack.server.auth import Guard, guard_for
from tierstack.server.config import TIERS, Settings
from tierstack.server.crosstier import CrossTierMonitor
from tierstack.server.interceptor import CarriedCalls, ServerInterceptor
from tierstack.server.metrics import MethodMetrics, process_metrics
from tierstack.server.monitor import MonitorServicer
from tierstack.server.prometheus import MetricsEndpoint
from tierstack.server.tls import ServerTls
from tierstack.server.tracing import Tracing
from tierstack.v1 import common_pb2, monitor_service_pb2, monitor_service_pb2_grpc

_log = logging.getLogger(__name__)


class BindError(OSError):
    """A server could not listen on the address it was given; the message names it."""


class TierService(Protocol):
    """What one tier contributes to its server: servicers to register and resources it owns."""

    #: The tier this service implements.
    tier: common_pb2.Tier.ValueType
    #: The full names of the gRPC services it registers (for health and reflection).
    service_names: tuple[str, ...]

    @property
    def cross_tier(self) -> CrossTierMonitor | None:
        """Watches all the tiers (Coordinate's); None elsewhere."""

    def register(self, server: grpc.aio.Server, carried: CarriedCalls) -> None:
        """Adds the tier's servicers to ``server``; ``carried`` serves the calls a stream carries as the
        server's interceptor serves calls of their own."""

    def fill_metrics(self, metrics: monitor_service_pb2.TierMetrics, method_filter: str) -> None:
        """Adds the tier's own metrics (its domain, and its calls to the tier below) to ``metrics``."""

    async def start(self, health: Callable[[bool], Awaitable[None]], ports: Collection[int]) -> None:
        """Starts the tier's background work; called before the server accepts calls, once it listens
        on ``ports`` (its gRPC and metrics ports). The tier may call ``health(False)`` while it cannot
        serve (its store fails, say) and ``health(True)`` once it can again."""

    def stopping(self) -> None:
        """Learns that the server is stopping, before its in-flight calls are cancelled."""

    async def close(self) -> None:
        """Cancels and awaits the tier's background work and closes what it owns."""


class TierServer:
    """A grpc.aio server for one tier.

    Args:
        service: The tier's servicers and resources.
        host: The address to bind.
        port: The port to bind; 0 picks a free one (see :attr:`port` after :meth:`start`).
        grace_seconds: How long in-flight calls may finish once :meth:`stop` is called.
        metrics_port: The port of the Prometheus endpoint; 0 picks a free one (see :attr:`metrics_port`
            after :meth:`start`), None serves none.
        interceptors: Server interceptors that run before tierstack's own (tracing, say).
        max_message_bytes: The largest message the server receives or sends.
        tls: The server's certificate and whether callers must present one (mutual TLS); None
            listens in plaintext.
        guard: Checks every call's credential and role (opened and closed with the server); None
            lets anyone call.
        max_concurrent_streams: How many calls one connection may have open at once.
    """

    def __init__(
        self,
        service: TierService,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        grace_seconds: float = 5.0,
        metrics_port: int | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: ServerTls | None = None,
        guard: Guard | None = None,
        max_concurrent_streams: int = 1000,
    ):
        self._max_streams = max_concurrent_streams
        self.service = service
        self._tls = tls
        self._guard = guard
        self._max_message_bytes = max_message_bytes
        self._interceptors = tuple(interceptors)
        self._requested_metrics_port = metrics_port
        self._endpoint: MetricsEndpoint | None = None
        self.metrics_port = 0
        self.metrics = MethodMetrics()
        self._host = host
        self._requested_port = port
        self._grace = grace_seconds
        self._health: health.aio.HealthServicer | None = None
        self._serving = True
        self._announced = False  # whether health has been reported since start
        monitor_name = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
        self._names = (*service.service_names, monitor_name)  # health and reflection name them
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        """Returns the address clients dial, once started."""
        return f"{self._host}:{self.port}"

    async def start(self) -> int:
        """Starts serving and returns the bound port; call it inside the loop that will serve.

        Raises:
            BindError: The port (or the metrics port) is taken or the address is not this host's;
                nothing of the tier has started.
        """
        self._health = health.aio.HealthServicer()
        self._server = grpc.aio.server(
            interceptors=[*self._interceptors, ServerInterceptor(self.metrics, self._guard)],
            options=[
                # Off, so that a second server on a taken port fails instead of sharing it.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.max_concurrent_streams", self._max_streams),
                # Idle connections are pinged so dead peers are found; a client may ping at most every
                # 10 s without calls in flight, and one that pings faster is cut off.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 2),
            ],
        )
        self._bind()  # before the tier starts: a server that cannot listen must not resume runs
        if self._guard is not None:
            await self._guard.open()
        service = self.service
        if service.cross_tier is not None:
            service.cross_tier.attach(self.snapshot)
        await service.start(self._report_health, {self.port, self.metrics_port} - {0})
        service.register(self._server, CarriedCalls(self.metrics, self._guard))
        monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(
            MonitorServicer(service.tier, self.snapshot, service.cross_tier), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*self._names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        await self._server.start()
        self._announced = True
        await self._report_health(self._serving)
        security = "plaintext" if self._tls is None else "mutual TLS" if self._tls.client_auth else "TLS"
        _log.info("tierstack %s serving on %s (%s)", common_pb2.Tier.Name(service.tier), self.target, security)
        return self.port

    async def _report_health(self, serving: bool) -> None:
        """Sets every health name of the server SERVING or NOT_SERVING (from start on; a stopping
        server stays NOT_SERVING)."""
        self._serving = serving
        if not self._announced or self._health is None:
            return  # start() reports it once the server serves
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self._names):
            await self._health.set(name, status)

    def _bind(self) -> None:
        """Binds the gRPC port and the metrics port.

        Raises:
            BindError: Either cannot be bound.
        """
        assert self._server is not None
        address = f"{self._host}:{self._requested_port}"
        try:
            if self._tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, self._tls.credentials())
        except RuntimeError:  # grpc says no more than that it failed to bind
            raise BindError(
                f"cannot listen on {address}: the port is taken or the address is not this host's"
            ) from None
        if self._requested_metrics_port is not None:
            self._endpoint = MetricsEndpoint(self.snapshot)
            try:
                self.metrics_port = self._endpoint.start(self._host, self._requested_metrics_port)
            except OSError as exc:
                metrics_address = f"{self._host}:{self._requested_metrics_port}"
                raise BindError(f"cannot serve metrics on {metrics_address}: {exc.strerror}") from None
            _log.info("Prometheus metrics at http://%s:%d/metrics", self._host, self.metrics_port)

    def snapshot(self, method_filter: str = "") -> monitor_service_pb2.TierMetrics:
        """Returns the tier's metrics now: its RPC methods, process and domain."""
        metrics = monitor_service_pb2.TierMetrics(
            tier=self.service.tier,
            collect_time=now_timestamp(),
            methods=self.metrics.messages(method_filter),
            process=process_metrics(),
        )
        self.service.fill_metrics(metrics, method_filter)
        return metrics

    async def stop(self) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish within the grace period, then closes
        the tier's resources; safe to call after a failed or partial :meth:`start`."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self.service.stopping()
        if self._server is not None:
            await self._server.stop(self._grace)
        if self._endpoint is not None:
            await self._endpoint.stop()
        if self._guard is not None:
            await self._guard.close()
        await self.service.close()
        _log.info("tierstack %s stopped", common_pb2.Tier.Name(self.service.tier))


async def serve_until_signalled(tier: str, settings: Settings) -> None:
    """Serves ``tier`` until SIGINT or SIGTERM, then stops it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tracing = Tracing(f"tierstack-{tier}")  # first: the tier's clients pick up the tracer provider
    server = TierServer(
        service_for(tier, settings),
        host=settings.host,
        port=settings.port,
        grace_seconds=settings.grace_seconds,
        metrics_port=settings.metrics_port,
        interceptors=tracing.server_interceptors(),
        max_message_bytes=settings.max_message_bytes,
        tls=settings.tls,
        guard=guard_for(settings),
        max_concurrent_streams=settings.max_concurrent_streams,
    )
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()
        await tracing.close()


def service_for(tier: str, settings: Settings) -> TierService:
    """Returns the service of ``tier`` (``execute``, ``orchestrate`` or ``coordinate``)."""
    if tier == "execute":
        from tierstack.server.execute.service import ExecuteService

        return ExecuteService(settings)
    if tier == "orchestrate":
        from tierstack.server.orchestrate.service import OrchestrateService

        return OrchestrateService(settings)
    if tier == "coordinate":
        from tierstack.server.coordinate.service import CoordinateService

        return CoordinateService(settings)
    raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
