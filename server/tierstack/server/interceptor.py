"""The server interceptor every tier uses: times each call per method and status code, and turns
domain errors into gRPC statuses with error details."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, cast

import grpc

from tierstack.client.errors import TierstackError
from tierstack.server.errors import DomainError
from tierstack.server.metrics import MethodMetrics
from tierstack.server.status import to_grpc_status

_log = logging.getLogger(__name__)

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def _code_name(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if error is not None else "OK"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Records a latency histogram per method and status code (a stream is timed to its end) and
    aborts with the mapped status when a handler raises a :class:`DomainError`."""

    def __init__(self, metrics: MethodMetrics) -> None:
        self._metrics = metrics
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._handlers[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """Returns ``handler`` with its behaviour observed; built once per method."""
        # grpc.aio servicers are coroutines and async generators; the stubs type the sync flavour.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, cast(UnaryBehavior, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            wrapped = (
                self._wrap_stream(method, cast(StreamBehavior, behavior))
                if inspect.isasyncgenfunction(behavior)
                # A stream written with context.write() (the health service's Watch) is a coroutine.
                else self._wrap_unary(method, cast(UnaryBehavior, behavior))
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # tierstack serves no client-streaming RPCs; pass others through untimed

    def _observe(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> _Observed:
        """Times the block as one call of ``method``; a domain error, or a failed call to the tier below,
        becomes the mapped status."""
        return _Observed(self, method, context)

    def _wrap_unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._observe(method, context):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with self._observe(method, context):
                async for response in behavior(request, context):
                    yield response

        return stream

    def _finish(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        error: BaseException | None,
        start: float,
    ) -> None:
        elapsed = time.perf_counter() - start
        if isinstance(error, DomainError | TierstackError):
            _log.info("%s failed: %s (%s)", method, error.message, error.reason)
        elif error is not None and not isinstance(error, asyncio.CancelledError | GeneratorExit | grpc.aio.AbortError):
            _log.exception("%s raised an unexpected error", method, exc_info=error)
        self._metrics.record(method, _code_name(context, error), elapsed)


class _Observed:
    """The block of one call: timed, with its errors mapped (a plain class: this runs on every call)."""

    __slots__ = ("_context", "_interceptor", "_method", "_start")

    def __init__(
        self, interceptor: ServerInterceptor, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._context = context
        self._start = time.perf_counter()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if isinstance(error, DomainError | TierstackError):
                await self._context.abort_with_status(to_grpc_status(error))
        finally:
            self._interceptor._finish(self._method, self._context, error, self._start)
        return False
