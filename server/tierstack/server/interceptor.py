"""The interceptors every tier uses. On the server side: each call timed per method and status code,
calls in flight and stream messages counted, and domain errors turned into gRPC statuses with error
details. On the client side (calls a tier makes to the next): the same measurements, so that a hop's
network time can be told from the callee's own time."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, cast

import asyncpg
import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from tierstack.client.clients import open_channel
from tierstack.client.tls import Tls
from tierstack.core.errors import Code, InvalidArgumentError, TierstackError, Violation
from tierstack.server import boundary
from tierstack.server.auth import audit
from tierstack.server.auth.guard import Guard, on_behalf
from tierstack.server.auth.principal import current as current_principal
from tierstack.server.auth.principal import stamp
from tierstack.server.metrics import MethodMetrics
from tierstack.server.status import status_of
from tierstack.server.tracing import client_interceptors

_log = logging.getLogger(__name__)

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
Deserializer = Callable[[bytes], Any]

#: What an unexpected failure tells the caller; the server's log has the details.
INTERNAL_MESSAGE = "the server failed unexpectedly while answering; its log has the details"
#: Failures to reach the store (a database restarting, a network cut): the call may be tried again,
#: here or on another replica, so they answer UNAVAILABLE.
OUT_OF_REACH = (
    ConnectionRefusedError,  # a new connection to the database refused: nothing was done
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)
UNAVAILABLE_MESSAGE = "the server cannot reach its store just now; try again"
_OWN = "/tierstack."
_OK = status_pb2.Status()
_INTERNAL = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=INTERNAL_MESSAGE)


def _unwritten(error: BaseException | None, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Says whether a handler is a generated servicer's method nobody wrote: it sets UNIMPLEMENTED
    and raises NotImplementedError (any other NotImplementedError is a failure like others)."""
    return isinstance(error, NotImplementedError) and context.code() == grpc.StatusCode.UNIMPLEMENTED


class _Malformed:
    """Stands for a request whose bytes are not a message of its type."""


_MALFORMED = _Malformed()


def _tolerant(deserialize: Deserializer | None) -> Deserializer | None:
    """Returns a deserializer that hands over :data:`_MALFORMED` instead of raising, so the call is
    answered INVALID_ARGUMENT like any other bad request (gRPC would answer INTERNAL)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError: invalid UTF-8, nesting past the parser's limit, bad bytes
            return _MALFORMED

    return parse


def malformed() -> InvalidArgumentError:
    """Returns the error that answers a request whose bytes are not a message of its type."""
    return InvalidArgumentError(
        [Violation("request", "cannot be parsed: malformed bytes, invalid UTF-8 or nesting too deep")],
        reason="MALFORMED_REQUEST",
    )


async def _checked(request: Any) -> None:
    """Holds a request to the bounds of :mod:`tierstack.server.boundary`.

    Raises:
        InvalidArgumentError: The request cannot be parsed or breaks a bound; every violation named.
    """
    if request is _MALFORMED:
        raise malformed()
    if not isinstance(request, Message) or not request.DESCRIPTOR.full_name.startswith("tierstack."):
        return  # gRPC's own services (health) bound their requests themselves
    violations = await boundary.check_off_loop(request)
    if violations:
        raise InvalidArgumentError(violations, reason="OUT_OF_BOUNDS")


def answer_of(error: BaseException | None) -> status_pb2.Status | None:
    """Returns the status a call that raised ``error`` answers: a domain error's own, UNAVAILABLE when
    the store is out of reach, INTERNAL (without its text) for any other exception; None when there is
    nothing to answer (no error, a cancelled call, or one the handler aborted itself)."""
    if isinstance(error, TierstackError):
        return status_of(error)
    if isinstance(error, OUT_OF_REACH):
        return status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message=UNAVAILABLE_MESSAGE)
    if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
        return _INTERNAL
    return None


def _code_name(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if error is not None else "OK"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Checks every request against the boundary's bounds before its handler sees it, records a
    latency histogram per method and status code (a stream is timed to its end), and aborts with the
    mapped status when a handler raises a :class:`TierstackError` (INTERNAL, without its text, for any
    other exception)."""

    def __init__(self, metrics: MethodMetrics, guard: Guard | None = None) -> None:
        self._metrics = metrics
        self._guard = guard
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
            if handler is None or (handler.stream_unary is not None and self._guard is not None):
                return None  # nor a kind of call that no check here covers (UNIMPLEMENTED)
            wrapped = self._handlers[method] = self._wrap(method, handler)
        if self._guard is not None:
            try:  # before the request is read: a caller without a credential costs no parsing
                await self._guard.authenticate(method, handler_call_details.invocation_metadata)
            except TierstackError as refusal:
                return self._refused(method, wrapped, refusal)
        return wrapped

    def _refused(
        self, method: str, wrapped: grpc.RpcMethodHandler[Any, Any], refusal: TierstackError
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Returns a handler of ``wrapped``'s kind that answers ``refusal``, its request left unread."""

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._observe(method, context) as observed:
                observed.audit(request)
                raise refusal

        def unread(data: bytes) -> None:
            return None

        if wrapped.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=unread)
        if wrapped.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse, request_deserializer=unread)
        return grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=unread)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """Returns ``handler`` with its behaviour observed; built once per method."""
        # grpc.aio servicers are coroutines and async generators; the stubs type the sync flavour.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, cast(UnaryBehavior, handler.unary_unary)),
                request_deserializer=_tolerant(handler.request_deserializer),
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
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        own = method.startswith(_OWN)
        if handler.stream_stream is not None and (own or self._guard is not None):  # carriers, reflection
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(method, handler.stream_stream),
                # A stream's calls are checked one by one by whoever serves them (CarriedCalls).
                request_deserializer=_tolerant(handler.request_deserializer) if own else handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # tierstack serves no client-streaming RPCs; pass others through untimed

    def _observe(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> _Observed:
        """Times the block as one call of ``method``; a domain error, or a failed call to the tier below,
        becomes the mapped status."""
        return _Observed(self, method, context)

    def _admit(self, method: str) -> None:
        """Checks the role of the caller (made current before the call was read) when auth is on."""
        if self._guard is not None:
            self._guard.authorize(method)

    def _wrap_unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._observe(method, context) as observed:
                observed.audit(request)  # refused calls too
                self._admit(method)
                await _checked(request)
                stamp(request)
                return await behavior(request, context)

        return unary

    def _wrap_bidi(self, method: str, behavior: Any) -> Any:
        async def bidi(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with self._observe(method, context):
                self._admit(method)
                async for response in behavior(requests, context):
                    yield response

        return bidi

    def _wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        messages = self._metrics.stream_messages

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with self._observe(method, context) as observed:
                observed.audit(request)  # refused calls too
                self._admit(method)
                await _checked(request)
                stamp(request)
                async for response in behavior(request, context):
                    messages[method] += 1
                    yield response

        return stream


def _finish(
    metrics: MethodMetrics,
    method: str,
    code: str,
    error: BaseException | None,
    start: float,
    audited: tuple[str, str] | None,
) -> None:
    """Logs how a call failed (unexpected failures with their traceback), records its latency under
    its method and status code, and audits it when ``audited`` names what it acted on and its peer."""
    elapsed = time.perf_counter() - start
    if isinstance(error, TierstackError):
        _log.info("%s failed: %s (%s)", method, error.message, error.reason)
    elif isinstance(error, OUT_OF_REACH):
        _log.warning("%s failed: the store is out of reach (%s)", method, type(error).__name__)
    elif (
        error is not None
        and not isinstance(error, asyncio.CancelledError | GeneratorExit | grpc.aio.AbortError)
        and code != "UNIMPLEMENTED"
    ):
        _log.exception("%s raised an unexpected error", method, exc_info=error)
    metrics.in_flight[method] -= 1
    metrics.record(method, code, elapsed)
    if audited is not None:
        audit.record(method, *audited, code)


class _Observed:
    """The block of one call: timed, with its errors mapped (a plain class: this runs on every call)."""

    __slots__ = ("_audited", "_context", "_interceptor", "_method", "_start")

    def __init__(
        self, interceptor: ServerInterceptor, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._context = context
        self._start = time.perf_counter()
        self._audited: tuple[str, str] | None = None  # what an audited call acts on, and its peer
        interceptor._metrics.in_flight[method] += 1

    def audit(self, request: Any) -> None:
        """Logs the call in the audit log when it ends, if its method changes state."""
        if self._method in audit.AUDITED:  # the peer is read now: once the call has ended it is gone
            self._audited = (audit.resource_of(request), audit.peer_of(self._context))

    async def __aenter__(self) -> _Observed:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if _unwritten(error, self._context):
                await self._context.abort(grpc.StatusCode.UNIMPLEMENTED, "the server does not offer this method")
            elif (status := answer_of(error)) is not None:
                await self._context.abort_with_status(rpc_status.to_status(status))
        finally:
            code = _code_name(self._context, error)
            _finish(self._interceptor._metrics, self._method, code, error, self._start, self._audited)
        return False


class CarriedCalls:
    """Serves the calls a stream carries (ExecuteStream, WatchRuns) as the interceptor serves calls of
    their own: each one authenticated (the stream's credential, again), authorised for the caller it
    names, checked against the boundary's bounds, stamped with its caller, timed per method and status
    code and audited, its failure turned into the status it would have answered.

    Args:
        metrics: The server's method metrics, which the carried calls join under their own methods.
        guard: Checks each call's credential and caller when auth is on.
    """

    def __init__(self, metrics: MethodMetrics, guard: Guard | None) -> None:
        self.metrics = metrics
        self._guard = guard

    async def serve(
        self,
        method: str,
        envelope: Message,
        request: Message,
        peer: str,
        behavior: Callable[[], Awaitable[None]],
        *,
        credentials: Sequence[tuple[str, Any]],
        tenant: str,
        caller: str,
    ) -> status_pb2.Status:
        """Serves one carried call of ``method`` (``request``, which came in ``envelope``, for the
        ``tenant`` and ``caller`` it names, on a stream opened with ``credentials``) by awaiting
        ``behavior`` once the call is admitted, and returns the status the call ended with (OK when
        nothing failed); raises only the call's cancellation (when its caller let it go). The
        stream's credential is checked again for each call: a key revoked since it opened, or a token
        since expired, carries nothing more."""
        metrics = self.metrics
        metrics.in_flight[method] += 1
        start = time.perf_counter()
        status = _OK
        error: BaseException | None = None
        try:
            if self._guard is not None:
                await self._guard.authenticate(method, credentials)
                self._guard.act_for(tenant, caller)
                self._guard.authorize(method)
            await _checked(envelope)
            stamp(request)
            await behavior()
        except asyncio.CancelledError as exc:
            error = exc
            raise
        except Exception as exc:
            error = exc
            status = answer_of(exc) or _INTERNAL
        finally:
            code = "CANCELLED" if isinstance(error, asyncio.CancelledError) else Code(status.code).name
            audited = (audit.resource_of(request), peer) if method in audit.AUDITED else None
            _finish(metrics, method, code, error, start, audited)
        return status


class _ClientMeasures:
    """Shared by the client interceptors of one tier: they record into one :class:`MethodMetrics`."""

    def __init__(self, metrics: MethodMetrics) -> None:
        self._metrics = metrics

    @contextlib.contextmanager
    def _measured(self, details: grpc.aio.ClientCallDetails) -> Iterator[str]:
        """Times the block as one call; its outcome is the status of the error it raises, else OK."""
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self._metrics.in_flight[method] += 1
        start = time.perf_counter()
        code = "OK"
        try:
            yield method
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self._metrics.in_flight[method] -= 1
            self._metrics.record(method, code, time.perf_counter() - start)


class UnaryClientInterceptor(_ClientMeasures, grpc.aio.UnaryUnaryClientInterceptor):
    """Times unary calls to the tier below, per method and status code."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        with self._measured(client_call_details):
            return await (await continuation(client_call_details, request))


class StreamClientInterceptor(_ClientMeasures, grpc.aio.UnaryStreamClientInterceptor):
    """Times server-streaming calls to the tier below to their end, and counts their messages."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return self._counted(client_call_details, await continuation(client_call_details, request))

    async def _counted(self, details: grpc.aio.ClientCallDetails, call: Any) -> AsyncIterator[Any]:
        messages = self._metrics.stream_messages
        with self._measured(details) as method:
            async for response in call:
                messages[method] += 1
                yield response


class _OnBehalf:
    """Adds the tier's key to each call to the tier below, and the tenant and caller it is for (two
    classes: gRPC takes an interceptor for one kind of call only)."""

    def __init__(self, tier_key: str) -> None:
        self._key = tier_key

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *on_behalf(current_principal(), self._key))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryOnBehalf(_OnBehalf, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamOnBehalf(_OnBehalf, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamStreamOnBehalf(_OnBehalf, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def tier_channel(
    target: str, metrics: MethodMetrics, *, max_message_bytes: int, tls: Tls | None, tier_key: str = ""
) -> grpc.aio.Channel:
    """Returns a channel to the tier below whose calls are measured into ``metrics``, carry the trace
    context (and, given ``tier_key``, the key and the caller they are for), send and receive messages
    of up to ``max_message_bytes``, over TLS when ``tls`` is given."""
    interceptors: list[Any] = [
        *client_interceptors(),
        UnaryClientInterceptor(metrics),
        StreamClientInterceptor(metrics),
    ]
    if tier_key:
        interceptors[:0] = [_UnaryOnBehalf(tier_key), _StreamOnBehalf(tier_key), _StreamStreamOnBehalf(tier_key)]
    return open_channel(target, max_message_bytes=max_message_bytes, tls=tls, interceptors=interceptors)
