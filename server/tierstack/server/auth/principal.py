"""Who a call is for, current for the task that answers it and the tasks that task starts."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from google.protobuf.message import Message

from tierstack.server.auth.keys import Role
from tierstack.v1 import common_pb2

#: The longest tenant or caller name taken from a credential or a tier.
MAX_NAME = 128


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call is for: the tenant, the caller within it, and what the credential may do."""

    tenant: str
    subject: str
    role: Role


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("tierstack_principal", default=None)


def current() -> Principal | None:
    """Returns who the running call (and the tasks it started) is for; None when auth is off."""
    return _current.get()


def act_as(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Makes ``principal`` current for this task and the tasks it starts."""
    return _current.set(principal)


def tenant_scope() -> str | None:
    """Returns the tenant whose resources the running call may see; None when auth is off (then no
    boundary between tenants is kept)."""
    principal = _current.get()
    return None if principal is None else principal.tenant


def namespaced(tenant: str, identifier: str) -> str:
    """Returns a caller-chosen id (an execution's, an approval's, a request's) in ``tenant``'s own
    namespace, so that two tenants choosing the same id never meet: behind the tenant's name and its
    length (no tenant's prefix is the start of another's); as it is for no tenant ("")."""
    return f"{len(tenant)}:{tenant}:{identifier}" if tenant else identifier


def unnamespaced(key: str) -> str:
    """Returns the id a key made by :func:`namespaced` holds, without its tenant."""
    length, colon, rest = key.partition(":")
    if colon and length.isdigit() and rest[int(length) : int(length) + 1] == ":":
        return rest[int(length) + 1 :]
    return key


def scoped(identifier: str) -> str:
    """Returns ``identifier`` in the current tenant's namespace (as it is when auth is off)."""
    return namespaced(tenant_scope() or "", identifier)


def in_scope(scoped_identifier: str) -> bool:
    """Tells whether an id made by :func:`scoped` belongs to the current tenant."""
    return scoped_identifier.startswith(scoped(""))


def stamp(request: Message) -> None:
    """Writes the current caller into a request's ``context`` (its tenant and user) over whatever the
    request says: the tenant comes from the credential, never from the body. Does nothing when auth
    is off or the request has no context."""
    principal = _current.get()
    if principal is None or "context" not in request.DESCRIPTOR.fields_by_name:
        return
    context = request.context  # type: ignore[attr-defined]
    if isinstance(context, common_pb2.RequestContext):
        context.tenant_id = principal.tenant
        context.user_id = principal.subject
