"""Who a call is for, current for the task that answers it and the tasks that task starts."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from tierstack.server.auth.keys import Role

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
