"""Token and cost accounting per call, run, tenant and model, and budgets checked before a call."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cachetools import LRUCache

from tierstack.core.errors import quoted
from tierstack.server.ai.models import Completion, CompletionRequest, ModelError
from tierstack.v1 import monitor_service_pb2 as monitor_pb

#: How many runs the ledger keeps totals for; the least recently charged are forgotten first.
KEPT_RUNS = 10_000
#: How many models, and tenants without a budget, the ledger keeps totals for (the same way).
KEPT_NAMES = 1_000


def estimate_tokens(request: CompletionRequest) -> int:
    """Estimates a request's prompt tokens before it is sent: about four characters per token."""
    characters = sum(len(m.content) + sum(len(str(c.arguments)) for c in m.tool_calls) for m in request.messages)
    characters += sum(len(t.description) + len(str(t.parameters)) for t in request.tools)
    return characters // 4 + 4 * len(request.messages)


@dataclass(frozen=True, slots=True)
class Price:
    """What a model costs, in credits per thousand tokens."""

    prompt: float = 0.0
    completion: float = 0.0


@dataclass(slots=True)
class Totals:
    """What some calls used."""

    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def tokens(self) -> int:
        """Returns prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens

    def message(self) -> monitor_pb.ModelUsage:
        """Returns the totals in their wire form."""
        return monitor_pb.ModelUsage(
            requests=self.calls,
            cached_requests=self.cached_calls,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost=self.cost,
        )


class Ledger:
    """Counts what each call spends and keeps totals by run, tenant and model: the totals of the
    most recently charged runs, models and tenants, and always those of tenants with a budget.

    Args:
        prices: Credits per thousand tokens by model; unknown models cost nothing.
        tenant_budgets: The tokens each named tenant may spend in all.
    """

    def __init__(
        self, prices: Mapping[str, Price] | None = None, tenant_budgets: Mapping[str, int] | None = None
    ) -> None:
        self._prices = dict(prices or {})
        self._tenant_budgets = dict(tenant_budgets or {})
        self.total = Totals()
        self.by_model: LRUCache[str, Totals] = LRUCache(KEPT_NAMES)
        self.by_run: LRUCache[str, Totals] = LRUCache(KEPT_RUNS)
        # A budget's spending is never forgotten, or forgetting it would refill the budget.
        self._budgeted = {tenant: Totals() for tenant in self._tenant_budgets}
        self._unbudgeted: LRUCache[str, Totals] = LRUCache(KEPT_NAMES)

    def by_tenant(self) -> Iterator[tuple[str, Totals]]:
        """Yields the totals kept by tenant."""
        yield from self._budgeted.items()
        yield from self._unbudgeted.items()

    def _tenant(self, tenant: str) -> Totals:
        totals = self._budgeted.get(tenant)
        return totals if totals is not None else self._unbudgeted.setdefault(tenant, Totals())

    def fit(self, request: CompletionRequest) -> CompletionRequest:
        """Returns ``request`` with its output tokens shrunk to what its caller and tenant have left.

        Raises:
            ModelError: ``TOKEN_BUDGET_EXHAUSTED`` when not even the prompt fits.
        """
        tenant_left = self._tenant_left(request.scope.tenant)
        limits = [budget for budget in (request.scope.token_budget, tenant_left) if budget is not None]
        if not limits:
            return request
        remaining = min(limits)
        room = remaining - estimate_tokens(request)
        if room <= 0:
            whose = f"tenant {quoted(request.scope.tenant)}" if remaining == tenant_left else "the caller"
            raise ModelError(
                "TOKEN_BUDGET_EXHAUSTED",
                f"{whose} has {max(remaining, 0)} tokens left, not enough for the prompt and an answer",
                transient=False,
            )
        if request.max_tokens is not None and request.max_tokens <= room:
            return request
        return dataclasses.replace(request, max_tokens=room)

    def _tenant_left(self, tenant: str) -> int | None:
        budget = self._tenant_budgets.get(tenant)
        if budget is None:
            return None
        return budget - self._budgeted[tenant].tokens

    def charge(self, request: CompletionRequest, answer: Completion) -> float:
        """Records one answered call and returns its cost in credits (nothing for a cached answer)."""
        price = self._prices.get(answer.model) or self._prices.get(request.model) or Price()
        prompt, completion = (0, 0) if answer.cached else (answer.usage.prompt_tokens, answer.usage.completion_tokens)
        cost = (prompt * price.prompt + completion * price.completion) / 1000
        buckets = [self.total, self.by_model.setdefault(answer.model, Totals())]
        if request.scope.tenant:
            buckets.append(self._tenant(request.scope.tenant))
        if request.scope.run:
            buckets.append(self.by_run.setdefault(request.scope.run, Totals()))
        for totals in buckets:
            totals.calls += 1
            totals.cached_calls += answer.cached
            totals.prompt_tokens += prompt
            totals.completion_tokens += completion
            totals.cost += cost
        return cost
