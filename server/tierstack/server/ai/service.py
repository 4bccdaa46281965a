"""The AI service both Tier 1 and Tier 3 ask: budget, cache, shared calls, then the models with retries,
a circuit breaker per provider and model, and a fallback chain of models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from collections.abc import Sequence

from cachetools import LRUCache

from tierstack.server.ai.accounting import KEPT_NAMES, Ledger, Price
from tierstack.server.ai.cache import ResponseCache, request_key
from tierstack.server.ai.local import LocalModel
from tierstack.server.ai.models import Completion, CompletionRequest, ModelError, ModelProvider
from tierstack.server.ai.openai_compatible import OpenAICompatibleModel
from tierstack.server.ai.sharing import Coalescer, EmbeddingBatcher, SharingStats
from tierstack.server.breaker import BreakerPolicy, Breakers
from tierstack.server.config import Settings
from tierstack.server.metrics import LatencyHistogram
from tierstack.v1 import monitor_service_pb2 as monitor_pb

#: The model name that means the local deterministic model.
LOCAL = "local"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Resilience:
    """How hard the service tries a model before it falls back to the next.

    Attributes:
        timeout: How long one call may take, in seconds.
        retries: How often a transient failure is retried on the same model.
        backoff: The base of the exponential backoff between retries, in seconds (full jitter).
        breaker: When a model's circuit breaker opens and closes.
    """

    timeout: float = 60.0
    retries: int = 2
    backoff: float = 0.2
    breaker: BreakerPolicy = dataclasses.field(default_factory=BreakerPolicy)


class AIService:
    """Answers completion requests as cheaply and dependably as it can.

    In order: the caller's and its tenant's token budgets shrink the answer to fit (or refuse the
    call); a deterministic request (temperature 0) seen before is answered from the cache; the rest
    go to the models of the chain, the requested model first, identical ones sharing a call in
    flight. Embedding requests made at once for a model go out as one list.

    Args:
        models: The fallback chain: model names, ``local`` for the local model.
        remote: The OpenAI-compatible API other names are sent to; None when there is none.
        cache: The response cache.
        ledger: Counts tokens and cost.
        batch_size: The most embedding requests of one call.
        batch_window: How long an embedding request may wait for its call, in seconds.
        resilience: Timeouts, retries and circuit breakers.
    """

    name = "ai"

    def __init__(
        self,
        models: Sequence[str] = (LOCAL,),
        *,
        remote: OpenAICompatibleModel | None = None,
        cache: ResponseCache | None = None,
        ledger: Ledger | None = None,
        batch_size: int = 10,
        batch_window: float = 0.1,
        resilience: Resilience = Resilience(),
    ) -> None:
        self.models = tuple(dict.fromkeys(models))
        self._local = LocalModel()
        self._remote = remote
        self.cache = cache if cache is not None else ResponseCache()
        self.ledger = ledger if ledger is not None else Ledger()
        self.sharing = SharingStats()
        self._coalescer = Coalescer(self._call, self.sharing)
        self._embeddings = EmbeddingBatcher(self._embed, self.sharing, size=batch_size, window=batch_window)
        self._resilience = resilience
        # Callers name models: a breaker and a histogram are kept for the most recently used only.
        self.breakers = Breakers(resilience.breaker, kept=KEPT_NAMES)
        self.latency: LRUCache[str, LatencyHistogram] = LRUCache(KEPT_NAMES)

    @classmethod
    def from_settings(cls, settings: Settings) -> AIService:
        """Builds the service a server's settings describe."""
        remote = (
            OpenAICompatibleModel(
                base_url=settings.model_base_url, model=settings.model, api_key=settings.model_api_key
            )
            if settings.model_base_url
            else None
        )
        prices = {model: Price(*pair) for model, pair in json.loads(settings.model_prices or "{}").items()}
        return cls(
            (settings.model, *settings.model_fallbacks),
            remote=remote,
            cache=ResponseCache(
                max_entries=settings.model_cache_entries,
                ttl_seconds=settings.model_cache_ttl_seconds,
                redis_url=settings.redis_url,
            ),
            ledger=Ledger(prices, json.loads(settings.tenant_token_budgets or "{}")),
            batch_size=settings.model_batch_size,
            batch_window=settings.model_batch_window_seconds,
            resilience=Resilience(timeout=settings.model_timeout_seconds, retries=settings.model_retries),
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        """Returns an answer to ``request`` (``cached`` says whether a model was asked for it).

        Raises:
            ModelError: The budget is spent, or no model of the chain could answer.
        """
        request = self.ledger.fit(dataclasses.replace(request, model=request.model or self.models[0]))
        key = request_key(request)
        deterministic = request.temperature == 0
        answer = await self.cache.get(key) if deterministic else None
        if answer is None:
            # Identical deterministic requests share a call; a sampled one gets its own sample.
            answer = await self._coalescer.submit(key if deterministic else uuid.uuid4().hex, request)
            if deterministic and not answer.cached and not answer.fallback:  # the requested model's answers only
                await self.cache.set(key, answer)
        return dataclasses.replace(answer, cost=self.ledger.charge(request, answer))

    def metrics(self) -> monitor_pb.ModelMetrics:
        """Returns what the service has done since the server started."""
        latency = LatencyHistogram()
        for histogram in self.latency.values():
            latency.merge(histogram)
        totals = self.ledger.total
        return monitor_pb.ModelMetrics(
            requests=totals.calls,
            cache_hits=self.cache.stats.l1_hits + self.cache.stats.l2_hits,
            cache_hit_rate=self.cache.stats.hit_rate,
            cache_lookups=self.cache.stats.lookups,
            coalesced=self.sharing.coalesced,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            cost=totals.cost,
            latency=latency.stats(),
            breakers=self.breakers.states(),
            by_model={model: totals.message() for model, totals in self.ledger.by_model.items()},
            by_tenant={tenant: totals.message() for tenant, totals in self.ledger.by_tenant()},
        )

    async def embed(self, texts: Sequence[str], *, model: str) -> list[list[float]]:
        """Returns one embedding vector per text from the model API.

        Raises:
            ModelError: No model API is configured, or it could not answer.
        """
        if self._remote is None:
            raise ModelError("MODEL_NOT_CONFIGURED", "embeddings need TIERSTACK_MODEL_BASE_URL", transient=False)
        return await self._embeddings.submit(texts, model)

    async def _embed(self, texts: Sequence[str], model: str) -> list[list[float]]:
        assert self._remote is not None
        return await self._remote.embed(texts, model=model)

    def _provider(self, model: str) -> ModelProvider | None:
        return self._local if model == LOCAL else self._remote

    async def _call(self, request: CompletionRequest) -> Completion:
        """Asks the requested model, then the rest of the chain, skipping models whose breaker is open."""
        failures: list[str] = []
        last: ModelError | None = None
        for model in dict.fromkeys((request.model, *self.models)):
            provider = self._provider(model)
            if provider is None:
                failures.append(f"{model}: no model API is configured (TIERSTACK_MODEL_BASE_URL)")
                continue
            route = f"{provider.name}/{model}"
            breaker = self.breakers.of(route)
            if not breaker.allow():
                failures.append(f"{route}: circuit open after repeated failures")
                continue
            try:
                answer = await self._attempts(provider, dataclasses.replace(request, model=model))
            except ModelError as exc:
                if exc.transient:
                    breaker.failed()
                else:  # the model answered, if only to refuse
                    breaker.succeeded()
                failures.append(f"{route}: {exc.message}")
                last = exc
                continue
            breaker.succeeded()
            return answer if model == request.model else dataclasses.replace(answer, fallback=True)
        raise ModelError(
            last.reason if last is not None else "MODEL_UNAVAILABLE",
            "no model could answer: " + "; ".join(failures),
            transient=last is None or last.transient,
        )

    async def _attempts(self, provider: ModelProvider, request: CompletionRequest) -> Completion:
        """Calls one model, retrying transient failures with exponential backoff and full jitter."""
        settings = self._resilience
        histogram = self.latency.setdefault(request.model, LatencyHistogram())
        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(settings.timeout):
                    answer = await provider.complete(request)
                histogram.record(time.perf_counter() - start)
                return answer
            except TimeoutError:
                error = ModelError("MODEL_TIMEOUT", f"no answer within {settings.timeout:g} s", transient=True)
            except ModelError as exc:
                error = exc
            if not error.transient or attempt == settings.retries:
                raise error
            await asyncio.sleep(random.uniform(0, settings.backoff * 2**attempt))
            attempt += 1

    async def close(self) -> None:
        """Ends the calls in flight and closes the connections."""
        await self._coalescer.close()
        await self._embeddings.close()
        await self.cache.close()
        if self._remote is not None:
            await self._remote.aclose()
