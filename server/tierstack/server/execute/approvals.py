"""Tool calls that wait for a person: approved, rejected, or rejected when nobody answers in time."""

from __future__ import annotations

import asyncio
import secrets
import time

from cachetools import TTLCache

from tierstack.server.errors import NotFoundError

#: How many approvals may wait at once; beyond it the oldest can no longer be answered (it times out).
MAX_PENDING = 10_000


class Approvals:
    """The approvals waiting in this server.

    Args:
        timeout: How long a call waits for an answer before it is rejected, in seconds.
    """

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        # Each expires with its timeout, so a call whose caller left before it was answered is forgotten.
        self._pending: TTLCache[str, tuple[str, asyncio.Future[str | None]]] = TTLCache(MAX_PENDING, timeout)

    def __len__(self) -> int:
        """Counts the approvals waiting for an answer."""
        return len(self._pending)

    def open(self, tool: str) -> tuple[str, int]:
        """Opens an approval for a call of ``tool``; returns its id and expiry (ns since the epoch)."""
        approval_id = secrets.token_hex(16)
        self._pending[approval_id] = (tool, asyncio.get_running_loop().create_future())
        return approval_id, time.time_ns() + round(self.timeout * 1e9)

    async def decision(self, approval_id: str) -> str | None:
        """Waits for the answer: None when approved, else why the call was rejected."""
        _, answer = self._pending[approval_id]
        try:
            return await asyncio.wait_for(answer, self.timeout)
        except TimeoutError:
            return f"nobody answered within {self.timeout:g} s"
        finally:
            self._pending.pop(approval_id, None)

    def _answer(self, approval_id: str, rejection: str | None) -> str:
        waiting = self._pending.get(approval_id)
        if waiting is None or waiting[1].done():
            raise NotFoundError("approval", approval_id)
        tool, answer = waiting
        answer.set_result(rejection)
        return tool

    def approve(self, approval_id: str) -> str:
        """Lets a waiting call run; returns its tool.

        Raises:
            NotFoundError: No call waits under that id (never opened, answered, or expired).
        """
        return self._answer(approval_id, None)

    def reject(self, approval_id: str, reason: str) -> str:
        """Rejects a waiting call; returns its tool.

        Raises:
            NotFoundError: No call waits under that id (never opened, answered, or expired).
        """
        return self._answer(approval_id, reason or "rejected")
