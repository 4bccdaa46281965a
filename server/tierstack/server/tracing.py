"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` environment variables and exported as
OTLP over gRPC (to Jaeger, or any collector).

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and ``OTEL_TRACES_EXPORTER`` is not ``none``); otherwise nothing is traced and nothing is sent. The
gRPC calls of every server and of its clients to the tier below carry the trace context, so one goal
makes one trace across the three processes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tierstack.core import tracing as spans
from tierstack.server.metrics import CARRIERS

# gRPC's own services (health, reflection) are not traced: they are not the work. Nor are the streams
# that carry calls (ExecuteStream, WatchRuns): they last as long as the server, and each call they
# carry has spans of its own, in its caller's trace.
_TRACED = filters.negate(
    filters.any_of(filters.service_prefix("grpc."), *(filters.method_name(name) for name in sorted(CARRIERS)))
)


class Tracing:
    """The tracer provider of one server process, if tracing is on.

    Args:
        service_name: The ``service.name`` of its spans unless ``OTEL_SERVICE_NAME`` names one.
        env: The environment to read.
    """

    def __init__(self, service_name: str, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        enabled = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) and env.get(
            "OTEL_TRACES_EXPORTER", "otlp"
        ) != "none"
        self.provider: TracerProvider | None = None
        if enabled:
            # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win.
            self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(self.provider)
            spans.use(self.provider)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Returns the interceptor that starts a span for each call served (none when off)."""
        if self.provider is None:
            return []
        return [aio_server_interceptor(tracer_provider=self.provider, filter_=_TRACED)]  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Sends the spans not yet exported and stops (off the event loop: it waits for the network)."""
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)


def client_interceptors() -> list[Any]:
    """Returns the interceptors that carry the trace context on calls to the tier below (none when
    tracing is off)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return []
    return list(aio_client_interceptors(tracer_provider=provider, filter_=_TRACED))  # type: ignore[no-untyped-call]
