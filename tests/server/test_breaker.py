"""The circuit breaker as the seed's resilience design has it: open after 5 failures within 60 s,
a probe after 30 s, closed after 2 probes in a row that work."""

from __future__ import annotations

from tierstack.server.breaker import CircuitBreaker


def state(breaker: CircuitBreaker) -> str:
    return breaker.state.value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_open_the_breaker_only_within_the_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)
    for _ in range(4):
        breaker.failed()
        clock.now += 20  # 5 failures over 80 s: never 5 within a minute
    breaker.failed()
    assert state(breaker) == "closed" and breaker.allow()
    for _ in range(4):
        breaker.failed()  # now 5 within the minute
    assert state(breaker) == "open"
    assert not breaker.allow()


def test_the_half_open_breaker_probes_once_at_a_time_and_closes_after_two_successes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)
    for _ in range(5):
        breaker.failed()
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow() and state(breaker) == "half_open"
    assert not breaker.allow()  # one probe in flight at a time
    breaker.succeeded()
    assert state(breaker) == "half_open"  # one success is not enough
    assert breaker.allow()
    breaker.succeeded()
    assert state(breaker) == "closed"
    for _ in range(4):
        breaker.failed()  # the failures before it opened no longer count
    assert state(breaker) == "closed"


def test_a_failed_probe_opens_the_breaker_again_and_a_lost_probe_is_replaced() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)
    for _ in range(5):
        breaker.failed()
    clock.now += 30
    assert breaker.allow()
    breaker.failed()
    assert state(breaker) == "open" and not breaker.allow()
    clock.now += 30
    assert breaker.allow()  # a probe that never reports back...
    clock.now += 30
    assert breaker.allow()  # ...holds the next one back for the pause only
