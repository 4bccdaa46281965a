"""The correlation id that ties every event and log line of one request together across tiers."""

from __future__ import annotations

import contextvars
import logging
import secrets

from tierstack.core.tracing import TraceIdFilter
from tierstack.v1 import common_pb2

_current: contextvars.ContextVar[str] = contextvars.ContextVar("tierstack_correlation_id", default="-")


def bind(context: common_pb2.RequestContext) -> str:
    """Makes the request's correlation id current for this task and the tasks it starts.

    Fills ``context.correlation_id`` with a new id when the caller sent none, and returns it.
    """
    if not context.correlation_id:
        context.correlation_id = secrets.token_hex(16)
    _current.set(context.correlation_id)
    return context.correlation_id


def current() -> str:
    """Returns the correlation id of the running task, or ``-`` outside any request."""
    return _current.get()


class CorrelationFilter(logging.Filter):
    """Adds ``correlation_id`` to every log record so the log format can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = _current.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    """Sends log lines to stderr, each carrying the current correlation id and trace id. A server's
    start and stop lines are logged at any level: ``tierstack up`` waits for the line that says a
    tier serves."""
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationFilter())
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] trace=%(trace_id)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("tierstack.server.app").setLevel(min(logging.INFO, root.level))
