"""Circuit breakers and retry with exponential backoff and jitter, per dependency.

Each dependency (PostgreSQL, Redis, KMS) has one `CircuitBreaker`:

    closed ──(threshold consecutive failures)──▶ open ──(reset_seconds)──▶ half-open
      ▲                                           ▲                           │
      └──────────────(trial succeeds)─────────────┼────(trial fails)──────────┘

While open, callers do not touch the dependency at all (`BreakerOpen` is raised at once);
after `reset_seconds` one trial call is let through (half-open). Retries use tenacity with
full-jitter exponential backoff (``wait_random_exponential``) and never wait less than the
time until the breaker lets the next trial through, so an outage costs one probe every
`reset_seconds`, and the first probe after the dependency returns succeeds.

`classify` maps an exception to the dependency it came from (or None for anything that is
not a transient dependency failure: bugs, integrity failures, and PostgreSQL errors that
one entry or the configuration caused; those are never retried here). PostgreSQL errors
are sorted by SQLSTATE in `postgres_error_kind`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Literal, TypeVar

import asyncpg
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from audit_worker.crypto import KeyUnavailableError
from audit_worker.errors import DatabaseUnavailable, KeyServiceUnavailable, RedisUnavailable

Dependency = Literal["postgres", "redis", "kms"]
DEPENDENCIES: tuple[Dependency, ...] = ("postgres", "redis", "kms")
T = TypeVar("T")


class BreakerState(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerOpen(Exception):
    """Raised instead of calling a dependency whose breaker is open."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"circuit breaker for {name} is open; next trial in {retry_in:.1f}s")
        self.name = name
        self.retry_in = retry_in


class CircuitBreaker:
    """A consecutive-failure circuit breaker. Not thread-safe: one event loop only.

    `clock` is injectable (monotonic seconds) so the state machine is testable without
    sleeping. `on_change(name, state)` is called on every transition (metrics, logs).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        reset_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_seconds <= 0:
            raise ValueError("reset_seconds must be > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.last_error: str | None = None
        self.last_failure_at: float | None = None  # monotonic

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker past its reset time reports half-open."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_seconds
        ):
            self._set(BreakerState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until a call would be allowed (0 when it is allowed now)."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self.reset_seconds - (self._clock() - self._opened_at))
        if state is BreakerState.HALF_OPEN and self._trial_in_flight:
            return self.reset_seconds
        return 0.0

    def allow(self) -> bool:
        """True when a call may go ahead. In half-open, only one trial at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def check(self) -> None:
        """`allow`, raising `BreakerOpen` when the call may not go ahead."""
        if not self.allow():
            raise BreakerOpen(self.name, self.retry_in())

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        self.last_error = None
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def record_failure(self, error: str = "") -> None:
        self._failures += 1
        self.last_error = error or self.last_error
        self.last_failure_at = self._clock()
        was_trial = self._trial_in_flight
        self._trial_in_flight = False
        if was_trial or self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """Give back a half-open trial that ended neither in success nor in failure
        (cancelled, or failed for a reason that is not this dependency's)."""
        self._trial_in_flight = False

    def _set(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_change is not None:
            self._on_change(self.name, state)

    def describe(self) -> dict[str, object]:
        return {
            "state": self.state.name.lower().replace("_", "-"),
            "consecutive_failures": self._failures,
            "last_error": self.last_error,
        }


# --------------------------------------------------------------------------- errors

# Socket-level failures (refused, reset, timed out) carry no dependency of their own: the
# caller says which dependency it was talking to.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisUnavailable)
_KMS_ERRORS: tuple[type[BaseException], ...] = (KeyUnavailableError, KeyServiceUnavailable)
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
# Client-side driver failures without a SQLSTATE: a connection lost or in a bad state
# (e.g. "cannot switch to state 15; another operation is in progress" on a pooled
# connection the server terminated mid-query). The pool replaces the connection.
_POSTGRES_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    DatabaseUnavailable,
)

PostgresErrorKind = Literal["transient", "entry", "halt"]

# What a PostgreSQL error means, by SQLSTATE (class = first two characters); the error-
# handling guide's table is this one. Exact codes are looked up before classes.
#   transient  the server or the connection; retried with backoff behind the breaker
#   entry      one entry's data; the batch is split until that entry is found, and only
#              it is dead-lettered (rule sqlstate_XXXXX)
#   halt       configuration or permissions; the writer stops loudly until fixed
_SQLSTATE_KINDS: dict[str, PostgresErrorKind] = {
    "08": "transient",  # connection exception
    "40": "transient",  # serialization failure, deadlock
    "53": "transient",  # insufficient resources (disk full, out of memory, too many connections)
    "57": "transient",  # operator intervention: admin or crash shutdown, cannot connect now
    "58": "transient",  # system error (I/O)
    "55P03": "transient",  # lock not available
    "55006": "transient",  # object in use
    "25006": "transient",  # read-only transaction: connected to a standby during a switchover
    "25P03": "transient",  # idle_in_transaction_session_timeout ended the transaction
    "25P04": "transient",  # transaction_timeout (PostgreSQL 17), e.g. while queued for the lock
    "57P04": "halt",  # database dropped
    "22": "entry",  # data exception (e.g. 22021 invalid byte sequence, 22001 too long)
    "23": "entry",  # integrity constraint violation (unique, check, not null, foreign key)
    "54": "entry",  # program limit exceeded (e.g. a row too large for an index)
}


def postgres_error_kind(exc: BaseException) -> PostgresErrorKind | None:
    """transient, entry or halt for a PostgreSQL error; None for anything else. A SQLSTATE
    in no row of the table halts: an error nobody planned for must not be retried forever
    or blamed on an entry."""
    if isinstance(exc, _POSTGRES_CLIENT_ERRORS):
        return "transient"
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    code = str(getattr(exc, "sqlstate", "") or "")
    return _SQLSTATE_KINDS.get(code) or _SQLSTATE_KINDS.get(code[:2]) or "halt"


_HINTS = {
    "28": "check the login and its password or IAM token (AUDIT_DATABASE_URL)",
    "3D": "the database in AUDIT_DATABASE_URL does not exist: fix the URL",
    "3F": "the audit schema is missing: run `audit-worker migrate`",
    "42501": "the login lacks a grant: GRANT audit_writer TO the worker's login, then "
    "run `audit-worker migrate` as the owner",
    "42": "the schema does not match this release: run `audit-worker migrate`",
    "57P04": "the database was dropped: point AUDIT_DATABASE_URL at the log's database",
}


def configuration_hint(code: str) -> str:
    """What an operator should do about a SQLSTATE that halts the writer."""
    return _HINTS.get(code) or _HINTS.get(code[:2]) or (
        "an unplanned database error: look up the SQLSTATE, fix the cause, and the writer "
        "resumes at its next check"
    )


def sqlstate(exc: BaseException) -> str | None:
    """The five-character SQLSTATE of a PostgreSQL error, when it is one."""
    code = str(getattr(exc, "sqlstate", "") or "")
    return code if len(code) == 5 and code.isalnum() else None


def classify(exc: BaseException, talking_to: Dependency | None = None) -> Dependency | None:
    """The dependency an exception says is failing (and so worth retrying), or None when
    it is not a transient dependency failure: a bug, an integrity failure, or a PostgreSQL
    error of kind entry or halt (see `postgres_error_kind`). Those are never retried."""
    if isinstance(exc, BreakerOpen):
        return exc.name if exc.name in DEPENDENCIES else None
    if isinstance(exc, _REDIS_ERRORS):
        return "redis"
    if isinstance(exc, _KMS_ERRORS):
        return "kms"
    kind = postgres_error_kind(exc)
    if kind is not None:
        return "postgres" if kind == "transient" else None
    if isinstance(exc, _TRANSPORT_ERRORS):
        return talking_to
    return None


# SQLSTATE classes whose messages name servers, roles and databases, never row values:
# connection (08), authorisation (28), catalog name (3D), resources (53), operator (57).
_SAFE_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "53", "57"})


def describe_error(exc: BaseException) -> str:
    """A log- and metric-safe description: the class, and PostgreSQL's SQLSTATE or the
    crypto layer's message (which names key references only). Never a value that might
    be patient data (asyncpg's messages can quote row values)."""
    name = type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and sqlstate:
        if str(sqlstate)[:2] in _SAFE_SQLSTATE_CLASSES:
            return f"{name} (SQLSTATE {sqlstate}): {exc}"
        return f"{name} (SQLSTATE {sqlstate})"
    if isinstance(exc, KeyUnavailableError | BreakerOpen | RedisError | OSError):
        text = str(exc)
        return f"{name}: {text}" if text else name
    return name


# --------------------------------------------------------------------------- retry


async def sleep_or_stop(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleep, waking early when `stop` is set."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def backoff(initial: float, maximum: float) -> wait_random_exponential:
    """Full-jitter exponential backoff: uniform(0, min(maximum, initial * 2**attempt))."""
    return wait_random_exponential(multiplier=initial, max=maximum)


def acquire(breakers: Sequence[CircuitBreaker]) -> None:
    """Let a call through every breaker, or through none (raising `BreakerOpen`)."""
    taken: list[CircuitBreaker] = []
    for breaker in breakers:
        if not breaker.allow():
            for other in taken:
                other.release()
            raise BreakerOpen(breaker.name, breaker.retry_in())
        taken.append(breaker)


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    *,
    breakers: dict[Dependency, CircuitBreaker],
    uses: Sequence[Dependency],
    initial: float = 0.1,
    maximum: float = 2.0,
    interrupt: asyncio.Event | None = None,
    on_retry: Callable[[Dependency, BaseException, float], None] | None = None,
) -> T:
    """Call `fn`, which talks to the dependencies `uses` (the first one owns socket errors),
    through their breakers until it succeeds, retrying dependency failures.

    A failure is charged to the dependency `classify` names, so a KMS error inside a
    database call opens the KMS breaker, not PostgreSQL's; a success closes every breaker
    in `uses`. Anything that is not a dependency failure propagates at once. When
    `interrupt` is set, waiting ends and the last error propagates (used for work that is
    not worth finishing on shutdown, such as reading the next batch).
    """
    if not uses:
        raise ValueError("uses must name at least one dependency")
    primary = uses[0]
    mine = [breakers[d] for d in uses]
    jitter = backoff(initial, maximum)

    def wait(state: RetryCallState) -> float:
        return max(jitter(state), *(b.retry_in() for b in mine))

    def is_dependency_failure(exc: BaseException) -> bool:
        return classify(exc, primary) is not None

    def give_up(_state: RetryCallState) -> bool:
        return interrupt is not None and interrupt.is_set()

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and exc is not None and not isinstance(exc, BreakerOpen):
            on_retry(classify(exc, primary) or primary, exc, state.upcoming_sleep)

    async def attempt() -> T:
        acquire(mine)
        try:
            value = await fn()
        except BaseException as exc:
            failing = classify(exc, primary)
            for dependency, breaker in zip(uses, mine, strict=True):
                if dependency == failing:
                    breaker.record_failure(describe_error(exc))
                else:
                    breaker.release()
            if failing is not None and failing not in uses and failing in breakers:
                breakers[failing].record_failure(describe_error(exc))
            raise
        for breaker in mine:
            breaker.record_success()
        return value

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_dependency_failure),
        wait=wait,
        stop=give_up,
        sleep=lambda seconds: sleep_or_stop(interrupt, seconds),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(attempt)
