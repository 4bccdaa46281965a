"""The audit log: one line per state-changing call, naming the tenant, the caller, the peer's
certificate (mutual TLS), the method, the resource and the outcome; never a credential (the metadata
is not read here)."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from tierstack.server.auth.guard import REQUIRED
from tierstack.server.auth.keys import Role
from tierstack.server.auth.principal import current

_log = logging.getLogger("tierstack.audit")

#: The RPCs that start, stop or change work (or spend tokens), whose every call is logged.
AUDITED = frozenset(method for method, role in REQUIRED.items() if role is Role.RUN)
#: The request fields that name the resource a call acts on, the most specific first.
_RESOURCE_FIELDS = ("approval_id", "execution_id", "run_id", "goal_id", "request_id")
#: The longest name of a resource, tenant or caller logged.
_MAX_RESOURCE = 128


def _plain(value: str) -> str:
    """Returns ``value`` cut short with anything not printable (and spaces) replaced, so that no
    caller can write lines or fields of its own into the log."""
    return "".join(c if c.isprintable() and c != " " else "?" for c in value[:_MAX_RESOURCE]) or "-"


def resource_of(request: Any) -> str:
    """Returns what a request acts on (its first id field that is set), or ``-``."""
    for name in _RESOURCE_FIELDS:
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return _plain(value)
    return "-"


def peer_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Returns who the caller's certificate, checked against the CA under mutual TLS, says it is (its
    first subject alternative name, else its common name), or ``-`` without one."""
    first = next(iter(context.peer_identities() or ()), b"")
    return _plain(first.decode(errors="replace"))


def record(method: str, resource: str, peer: str, code: str) -> None:
    """Logs one audited call by the caller current for this task, from ``peer`` (see :func:`peer_of`)."""
    principal = current()
    tenant, caller = (_plain(principal.tenant), _plain(principal.subject)) if principal is not None else ("-", "-")
    _log.info(
        "audit tenant=%s caller=%s peer=%s method=%s resource=%s code=%s",
        tenant,
        caller,
        peer,
        method.rpartition("/")[2],
        resource,
        code,
        extra={
            "tenant": tenant,
            "caller": caller,
            "peer": peer,
            "method": method,
            "resource": resource,
            "code": code,
        },
    )
