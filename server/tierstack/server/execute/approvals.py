"""Tool calls that wait for a person: approved, rejected, or rejected when nobody answers in time.

Approvals live in the execution store, so a call keeps waiting across a restart of the server: the
step, asked for again under the same execution id, finds the approval it opened before (same id,
same expiry) and waits for it, or takes the answer given meanwhile. On a store replicas share, any
replica takes the answer; the one whose step waits hears of it.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from google.protobuf import struct_pb2

from tierstack.core.errors import NotFoundError
from tierstack.server.auth.principal import in_scope
from tierstack.server.execute.store import Approval, ExecutionStore

# How long a call waiting on a store replicas share goes without reading its approval again, should
# the notification of its answer be lost.
_LOOK_AGAIN = 1.0


class Approvals:
    """The approvals of one server.

    Args:
        store: Where approvals are kept.
        timeout: How long a call waits for an answer before it is rejected, in seconds.
    """

    def __init__(self, store: ExecutionStore, *, timeout: float) -> None:
        self.timeout = timeout
        self._store = store
        self._answers: dict[str, asyncio.Future[None]] = {}  # approval id → set when it is answered here

    def __len__(self) -> int:
        """Counts the calls of this server that wait for an answer now."""
        return len(self._answers)

    async def open(self, execution_id: str, index: int, tool: str, arguments: struct_pb2.Struct) -> Approval:
        """Opens the approval of call ``index`` of an execution, or returns the one opened before."""
        return await self._store.open_approval(
            Approval(
                approval_id=secrets.token_hex(16),
                execution_id=execution_id,
                index=index,
                tool=tool,
                arguments=arguments.SerializeToString(),
                expire_ns=time.time_ns() + round(self.timeout * 1e9),
            )
        )

    async def decision(self, approval: Approval) -> str | None:
        """Waits for the answer (given here or, on a store replicas share, on any replica) until the
        approval expires: None when approved, else why the call was rejected."""
        approval_id = approval.approval_id
        answered = self._answers.setdefault(approval_id, asyncio.get_running_loop().create_future())
        try:
            kept = await self._store.approval(approval_id)
            while kept is not None and not kept.decided:
                left = max(kept.expire_ns - time.time_ns(), 0) / 1e9
                if not left:
                    await self._store.decide(approval_id, f"nobody answered within {self.timeout:g} s")
                elif not self._store.shared:
                    await asyncio.wait([answered], timeout=left)
                else:  # answered elsewhere: heard by NOTIFY, or read at the next look should that be lost
                    heard = asyncio.ensure_future(self._store.wait_changed(approval_id, min(left, _LOOK_AGAIN)))
                    try:
                        await asyncio.wait([answered, heard], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        heard.cancel()
                        await asyncio.gather(heard, return_exceptions=True)
                kept = await self._store.approval(approval_id)
        finally:
            self._answers.pop(approval_id, None)
        if kept is None:
            return "the approval was forgotten before anyone answered"
        return kept.rejection or None

    async def _answer(self, approval_id: str, rejection: str | None) -> str:
        kept = await self._store.approval(approval_id)
        # Another tenant's approval is as unknown as one never opened.
        expired = kept is None or kept.expire_ns < time.time_ns() or not in_scope(kept.execution_id)
        answered = None if expired else await self._store.decide(approval_id, rejection)
        if answered is None:
            raise NotFoundError("approval", approval_id)
        waiting = self._answers.get(approval_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        return answered.tool

    async def approve(self, approval_id: str) -> str:
        """Lets a waiting call run; returns its tool.

        Raises:
            NotFoundError: No call waits under that id (never opened, answered, or expired).
        """
        return await self._answer(approval_id, None)

    async def reject(self, approval_id: str, reason: str) -> str:
        """Rejects a waiting call; returns its tool.

        Raises:
            NotFoundError: No call waits under that id (never opened, answered, or expired).
        """
        return await self._answer(approval_id, reason or "rejected")
