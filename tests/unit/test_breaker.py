"""The circuit breaker's state machine and the retry loop around it (no servers, no sleeps)."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from audit_worker.crypto import KeyUnavailableError
from audit_worker.errors import SequenceError
from audit_worker.resilience import (
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    acquire,
    call_with_retry,
    classify,
    describe_error,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, threshold: int = 3, reset: float = 2.0) -> CircuitBreaker:
    changes: list[BreakerState] = []
    b = CircuitBreaker(
        "postgres", failure_threshold=threshold, reset_seconds=reset, clock=clock,
        on_change=lambda _name, state: changes.append(state),
    )
    b.changes = changes  # type: ignore[attr-defined]
    return b


def test_opens_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure("boom")
    assert b.state is BreakerState.CLOSED
    b.record_success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.record_failure("boom")
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    assert b.retry_in() == pytest.approx(2.0)
    assert b.changes == [BreakerState.OPEN]  # type: ignore[attr-defined]


def test_half_open_lets_exactly_one_trial_through() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1)
    b.record_failure("down")
    clock.now += 1.0
    assert b.state is BreakerState.OPEN and b.retry_in() == pytest.approx(1.0)
    clock.now += 1.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the trial
    assert not b.allow()  # nobody else while it runs
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.changes == [  # type: ignore[attr-defined]
        BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED,
    ]


def test_failed_trial_reopens_for_a_full_reset_period() -> None:
    clock = Clock()
    b = breaker(clock, threshold=5, reset=3.0)
    for _ in range(5):
        b.record_failure("down")
    clock.now += 3.0
    assert b.allow()
    b.record_failure("still down")
    assert b.state is BreakerState.OPEN
    assert b.retry_in() == pytest.approx(3.0)
    assert b.last_error == "still down"


def test_released_trial_can_be_taken_again() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1)
    b.record_failure("down")
    clock.now += 2.0
    assert b.allow()
    b.release()
    assert b.allow()


def test_acquire_takes_all_breakers_or_none() -> None:
    clock = Clock()
    first, second = breaker(clock, threshold=1), breaker(clock, threshold=1)
    first.record_failure("x")
    second.record_failure("y")
    clock.now += 2.0  # both half-open
    second.allow()  # someone else holds second's trial
    with pytest.raises(BreakerOpen):
        acquire([first, second])
    assert first.allow()  # first's trial was given back


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", reset_seconds=0)


def test_errors_are_charged_to_the_right_dependency() -> None:
    assert classify(asyncpg.exceptions.AdminShutdownError("x")) == "postgres"
    assert classify(asyncpg.exceptions.ConnectionDoesNotExistError("x")) == "postgres"
    assert classify(asyncpg.InternalClientError("another operation is in progress")) == (
        "postgres"
    )
    assert classify(RedisConnectionError("x")) == "redis"
    assert classify(KeyUnavailableError("kms down", ref="kms:k")) == "kms"
    assert classify(ConnectionRefusedError(), "redis") == "redis"
    assert classify(TimeoutError(), "postgres") == "postgres"
    assert classify(SequenceError("gap")) is None  # integrity: never retried
    assert classify(ValueError("bug")) is None


def test_error_descriptions_never_quote_row_values() -> None:
    exc = asyncpg.exceptions.UniqueViolationError(
        'duplicate key value violates unique constraint: Key (patient)=(MRN-123)'
    )
    exc.sqlstate = "23505"  # type: ignore[attr-defined]
    text = describe_error(exc)
    assert "MRN" not in text and "23505" in text


def _breakers() -> dict:  # type: ignore[type-arg]
    return {
        name: CircuitBreaker(name, failure_threshold=2, reset_seconds=0.05)
        for name in ("postgres", "redis", "kms")
    }


async def test_retry_until_success_counts_retries_and_closes_the_breaker() -> None:
    breakers = _breakers()
    calls = 0
    retries: list[str] = []

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 4:
            raise ConnectionRefusedError("refused")
        return "ok"

    result = await call_with_retry(
        flaky, breakers=breakers, uses=("postgres",), initial=0.001, maximum=0.01,
        on_retry=lambda dep, _exc, _wait: retries.append(dep),
    )
    assert result == "ok" and calls == 5
    assert retries == ["postgres"] * 4
    assert breakers["postgres"].state is BreakerState.CLOSED


async def test_retry_never_retries_integrity_failures() -> None:
    breakers = _breakers()
    calls = 0

    async def tampered() -> None:
        nonlocal calls
        calls += 1
        raise SequenceError("index 20 found where 10 was expected")

    with pytest.raises(SequenceError):
        await call_with_retry(tampered, breakers=breakers, uses=("postgres",))
    assert calls == 1
    assert breakers["postgres"].state is BreakerState.CLOSED


async def test_kms_failure_inside_a_database_call_opens_the_kms_breaker() -> None:
    breakers = _breakers()
    calls = 0

    async def rotate_then_store() -> int:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise KeyUnavailableError("KMS unreachable", ref="kms:k")
        return calls

    await call_with_retry(
        rotate_then_store, breakers=breakers, uses=("postgres",), initial=0.001, maximum=0.01
    )
    assert breakers["kms"].consecutive_failures == 2
    assert breakers["postgres"].consecutive_failures == 0


async def test_interrupt_ends_the_retrying_with_the_last_error() -> None:
    breakers = _breakers()
    interrupt = asyncio.Event()

    async def down() -> None:
        interrupt.set()
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        await call_with_retry(down, breakers=breakers, uses=("redis",), interrupt=interrupt)


async def test_open_breaker_makes_callers_wait_instead_of_hammering() -> None:
    breakers = _breakers()
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    async def down_then_up() -> None:
        attempts.append(loop.time())
        if len(attempts) < 5:
            raise ConnectionResetError("reset")

    await call_with_retry(
        down_then_up, breakers=breakers, uses=("postgres",), initial=0.0001, maximum=0.0001
    )
    # after the breaker opened (2 failures), attempts are spaced by its reset time
    gaps = [b - a for a, b in itertools.pairwise(attempts[2:])]
    assert all(gap >= 0.045 for gap in gaps), gaps


def test_breaker_states_keep_the_values_the_state_gauge_publishes() -> None:
    # audit_breaker_state exports state.value: dashboards and alerts read 0, 1 and 2.
    assert {s.name: s.value for s in BreakerState} == {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}


def test_by_default_three_failures_open_it_for_two_seconds() -> None:
    clock = Clock()
    b = CircuitBreaker("redis", clock=clock)
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now += 1.99
    assert b.state is BreakerState.OPEN and b.retry_in() == pytest.approx(0.01)
    clock.now += 0.01
    assert b.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"failure_threshold": 0}, "failure_threshold must be >= 1"),
    ({"reset_seconds": 0}, "reset_seconds must be > 0"),
])
def test_a_breaker_that_could_never_close_or_open_is_refused(
        kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        CircuitBreaker("redis", **kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message
    CircuitBreaker("redis", failure_threshold=1, reset_seconds=0.001)  # the smallest allowed


def test_an_open_breaker_says_when_the_next_trial_is() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1, reset=2.0)
    assert b.retry_in() == 0.0  # closed
    b.record_failure("refused")
    clock.now += 1.5
    assert b.retry_in() == pytest.approx(0.5)
    with pytest.raises(BreakerOpen) as caught:
        b.check()
    assert (caught.value.name, caught.value.retry_in) == ("postgres", pytest.approx(0.5))
    assert str(caught.value) == "circuit breaker for postgres is open; next trial in 0.5s"
    clock.now += 0.5
    assert b.retry_in() == 0.0  # half-open, no trial yet: a call may go now
    b.check()  # takes the trial
    assert b.retry_in() == 2.0  # the trial is out: wait for it


def test_a_closed_breaker_lets_every_call_through() -> None:
    b = breaker(Clock())
    for _ in range(5):
        b.check()
    assert b.state is BreakerState.CLOSED


def test_a_released_trial_that_then_fails_opens_it_again() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1)
    b.record_failure()
    clock.now += 2.0
    assert b.allow()
    b.release()
    b.record_failure("still down")
    assert b.state is BreakerState.OPEN


def test_failures_and_successes_record_what_happened() -> None:
    clock = Clock()
    b = breaker(clock)
    assert (b.last_error, b.last_failure_at, b.consecutive_failures) == (None, None, 0)
    b.record_failure("refused")
    clock.now = 101.0
    b.record_failure()  # no text: the last one stays
    assert (b.last_error, b.last_failure_at, b.consecutive_failures) == ("refused", 101.0, 2)
    assert b.describe() == {"state": "closed", "consecutive_failures": 2,
                            "last_error": "refused"}
    b.record_failure("reset")
    assert b.describe() == {"state": "open", "consecutive_failures": 3, "last_error": "reset"}
    clock.now += 2.0
    assert b.describe()["state"] == "half-open"
    assert b.allow()
    b.record_success()
    assert b.describe() == {"state": "closed", "consecutive_failures": 0, "last_error": None}
    assert b.allow() and b.allow()  # no trial left in flight


def test_state_changes_are_reported_with_the_breakers_name() -> None:
    seen: list[tuple[str, BreakerState]] = []
    b = CircuitBreaker("kms", failure_threshold=1, clock=Clock(),
                       on_change=lambda name, state: seen.append((name, state)))
    b.record_failure()
    assert seen == [("kms", BreakerState.OPEN)]
