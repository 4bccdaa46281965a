"""The AI service against an OpenAI-compatible server on loopback that counts the calls it receives."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from tests.helpers import FakeOpenAI, HttpServer, wait_for
from tierstack.server.ai import (
    AIService,
    CompletionRequest,
    Ledger,
    Message,
    ModelError,
    OpenAICompatibleModel,
    Price,
    Resilience,
    ResponseCache,
    Scope,
)
from tierstack.server.breaker import BreakerPolicy

Build = Callable[..., AIService]


@pytest.fixture
def fake(http_server: HttpServer) -> FakeOpenAI:
    return FakeOpenAI(http_server)


@pytest.fixture
async def build(fake: FakeOpenAI) -> AsyncIterator[Build]:
    built: list[AIService] = []

    def make(*models: str, **options: object) -> AIService:
        remote = OpenAICompatibleModel(base_url=fake.base_url, model="tiny")
        options.setdefault("resilience", Resilience(backoff=0.001))
        service = AIService(models or ("tiny",), remote=remote, **options)  # type: ignore[arg-type]
        built.append(service)
        return service

    yield make
    for service in built:
        await service.close()


def ask(text: str, **fields: object) -> CompletionRequest:
    return CompletionRequest(messages=(Message("user", text),), **fields)  # type: ignore[arg-type]


async def test_a_repeated_request_is_answered_from_the_cache(build: Build, fake: FakeOpenAI) -> None:
    service = build()
    first = await service.complete(ask("hello"))
    second = await service.complete(ask("hello"))
    assert (first.content, second.content) == ("echo: hello", "echo: hello")
    assert (first.cached, second.cached) == (False, True)
    assert len(fake.requests) == 1
    assert (service.ledger.total.calls, service.ledger.total.cached_calls, service.ledger.total.tokens) == (2, 1, 18)
    # A sampled answer is never reused, nor shared by requests made at the same time.
    await asyncio.gather(*(service.complete(ask("hello", temperature=0.7)) for _ in range(3)))
    assert len(fake.requests) == 4


async def test_a_tenant_is_never_answered_from_another_tenants_call(build: Build, fake: FakeOpenAI) -> None:
    service = build()
    acme, globex = Scope(tenant="acme"), Scope(tenant="globex")
    await service.complete(ask("our merger plan", scope=acme))
    assert (await service.complete(ask("our merger plan", scope=acme))).cached
    # The same question from another tenant is asked again: a cached answer would tell it that acme asked.
    assert not (await service.complete(ask("our merger plan", scope=globex))).cached
    await asyncio.gather(*(service.complete(ask("at once", scope=scope)) for scope in (acme, globex)))
    assert [request["messages"][-1]["content"] for request in fake.requests] == [
        "our merger plan",
        "our merger plan",
        "at once",
        "at once",
    ]


async def test_the_memory_cache_forgets_the_least_recently_used(build: Build, fake: FakeOpenAI) -> None:
    service = build(cache=ResponseCache(max_entries=2))
    for text in ("a", "b", "a", "c"):  # "a" was used after "b", so "b" is the one forgotten
        await service.complete(ask(text))
    assert len(fake.requests) == 3
    assert (await service.complete(ask("a"))).cached
    assert not (await service.complete(ask("b"))).cached
    assert len(fake.requests) == 4


async def test_concurrent_requests_share_calls_and_each_gets_its_own_answer(build: Build, fake: FakeOpenAI) -> None:
    service = build()
    texts = [f"question {n % 10}" for n in range(100)]
    answers = await asyncio.gather(*(service.complete(ask(text)) for text in texts))
    assert [answer.content for answer in answers] == [f"echo: {text}" for text in texts]
    assert len(fake.requests) == 10
    assert service.ledger.total.tokens == 10 * 18  # only the calls made are paid for
    assert service.sharing.coalesced == 90


async def test_a_quick_answer_never_waits_for_a_slow_one(build: Build, fake: FakeOpenAI) -> None:
    """Different requests are different calls: each caller is answered when its own call ends."""
    service = build()
    released = threading.Event()
    fake.held = {"first": released, "slow": released}
    try:
        first = asyncio.create_task(service.complete(ask("first")))
        await wait_for(lambda: bool(fake.requests))  # a call is in flight: the next come while the model is busy
        slow = asyncio.create_task(service.complete(ask("slow")))
        quick = await service.complete(ask("quick"))
        assert quick.content == "echo: quick" and fake.answered == ["quick"]  # the others still at the model
    finally:
        released.set()
    assert [(await task).content for task in (first, slow)] == ["echo: first", "echo: slow"]


async def test_embedding_requests_made_at_once_go_out_as_one_call(build: Build, fake: FakeOpenAI) -> None:
    service = build(batch_size=10, batch_window=0.05)
    fake.delay = 0.05  # the first call is in flight while the others arrive
    texts = [f"text number {n}" for n in range(21)]
    vectors = await asyncio.gather(*(service.embed([text], model="tiny-embed") for text in texts))
    assert [len(found) for found in vectors] == [1] * 21
    assert vectors[5] != vectors[6] and vectors[5] == await service.embed([texts[5]], model="tiny-embed")
    assert service.sharing.embed_requests == 22
    assert fake.embed_calls == service.sharing.embed_calls < 21  # the first alone, then batches of up to 10


async def test_one_failing_request_of_a_batch_fails_alone(build: Build, fake: FakeOpenAI) -> None:
    service = build(resilience=Resilience(retries=0))
    fake.failing.add("bad")
    results = await asyncio.gather(*(service.complete(ask(t)) for t in ("one", "bad", "two")), return_exceptions=True)
    assert [getattr(r, "content", None) for r in results] == ["echo: one", None, "echo: two"]
    assert isinstance(results[1], ModelError) and results[1].reason == "MODEL_REJECTED"
    assert "tiny" in results[1].message


async def test_the_answer_shrinks_to_the_callers_budget(build: Build, fake: FakeOpenAI) -> None:
    service = build()
    await service.complete(ask("short question", max_tokens=500, scope=Scope(token_budget=100)))
    assert 0 < fake.requests[0]["max_tokens"] < 100
    with pytest.raises(ModelError) as refused:
        await service.complete(ask("another question", scope=Scope(token_budget=3)))
    assert refused.value.reason == "TOKEN_BUDGET_EXHAUSTED"
    assert len(fake.requests) == 1  # refused before any call was made


async def test_tokens_and_cost_are_counted_per_run_tenant_and_model(build: Build, fake: FakeOpenAI) -> None:
    service = build(ledger=Ledger({"tiny": Price(prompt=1.0, completion=2.0)}, tenant_budgets={"acme": 20}))
    first = await service.complete(ask("one", scope=Scope(tenant="acme", run="r1")))
    assert first.cost == pytest.approx((11 * 1.0 + 7 * 2.0) / 1000)
    await service.complete(ask("two", scope=Scope(tenant="other", run="r2")))
    ledger = service.ledger
    assert ledger.by_model["tiny"].tokens == 36
    assert ledger.by_run["r1"].tokens == dict(ledger.by_tenant())["acme"].tokens == 18
    assert dict(ledger.by_tenant())["acme"].cost == pytest.approx((11 * 1.0 + 7 * 2.0) / 1000)
    with pytest.raises(ModelError) as refused:  # acme has 2 of its 20 tokens left: too few
        await service.complete(ask("three", scope=Scope(tenant="acme")))
    assert "tenant 'acme'" in refused.value.message
    assert len(fake.requests) == 2


async def test_transient_failures_are_retried_then_the_next_model_answers(build: Build, fake: FakeOpenAI) -> None:
    service = build(
        "tiny", "local", resilience=Resilience(retries=2, backoff=0.001, breaker=BreakerPolicy(threshold=2))
    )
    fake.status = 503
    answer = await service.complete(ask("hello"))
    assert (answer.model, answer.content) == ("local", "hello")
    assert len(fake.requests) == 3  # the first try and two retries
    await service.complete(ask("hello again"))
    assert len(fake.requests) == 6
    await service.complete(ask("and again"))  # two failures in a row opened tiny's breaker
    assert len(fake.requests) == 6
    assert service.breakers.states()["openai-compatible/tiny"] == "open"
    assert answer.fallback and not (await service.complete(ask("hello"))).cached  # fallback answers are not kept


async def test_a_slow_model_times_out(build: Build, fake: FakeOpenAI) -> None:
    service = build(resilience=Resilience(timeout=0.2, retries=0))
    fake.delay = 1.0
    with pytest.raises(ModelError) as timed_out:
        await service.complete(ask("hello"))
    assert timed_out.value.reason == "MODEL_TIMEOUT" and timed_out.value.transient


async def test_redis_shares_answers_between_servers_and_an_outage_fails_nothing(
    build: Build, fake: FakeOpenAI, redis_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, process = redis_server
    first = build(cache=ResponseCache(redis_url=url))
    second = build(cache=ResponseCache(redis_url=url))  # another server: its memory cache is empty
    await first.complete(ask("shared"))
    answer = await second.complete(ask("shared"))
    assert answer.cached and answer.content == "echo: shared"
    assert second.cache.stats.l2_hits == 1
    assert len(fake.requests) == 1
    process.terminate()
    await asyncio.to_thread(process.wait, 10)
    assert (await second.complete(ask("shared"))).cached  # now from its own memory
    third = build(cache=ResponseCache(redis_url=url))
    assert (await third.complete(ask("new question"))).content == "echo: new question"
    assert (await third.complete(ask("new question"))).cached
    assert third.cache.stats.l2_errors >= 1
