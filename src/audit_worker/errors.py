"""The worker's exception hierarchy.

    AuditError
    ├── ConfigurationError        settings missing or invalid; fix the setting named
    │   └── TlsError              a TLS certificate check failed or cannot be set up
    ├── DependencyError           PostgreSQL, Redis or KMS unreachable; transient, retried
    │   ├── DatabaseUnavailable
    │   ├── RedisUnavailable
    │   └── KeyServiceUnavailable
    ├── MigrationError            schema not at the expected version, or a checksum changed
    └── IntegrityError            the log is not what it must be; stop writing and alert
        ├── SequenceError         indices are not gapless where the sequencer expected them
        ├── UntrustedHeadError    the tree head a worker would resume from fails a check
        ├── AdoptedRowError       a row another writer stored does not hash to its leaf
        └── DeadLetterChainError  a dead letter's chain index or chain hash is wrong

Validation failures of single events are not exceptions: they are `Rejection` values
(see `events.py`) that go to the dead-letter store while the worker keeps going.

Key-service errors (botocore) are mapped to `audit_worker.crypto` errors with
``raise ... from exc``. Driver errors (asyncpg, redis) are not wrapped: `resilience.py`
classifies them by dependency for the circuit breakers and retries, and counts the
`DependencyError` subclasses above as belonging to the same dependency.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every error the worker raises on purpose."""


class ConfigurationError(AuditError):
    """A setting is missing or invalid. The message names the setting and the fix."""


class TlsError(ConfigurationError):
    """TLS to PostgreSQL or Redis failed its certificate check, or its CA file is missing.
    Waiting does not fix it: the message names the CA setting (or the URL's host) to fix."""


class DependencyError(AuditError):
    """A dependency did not answer. Transient: callers retry with backoff."""


class DatabaseUnavailable(DependencyError):
    pass


class RedisUnavailable(DependencyError):
    pass


class KeyServiceUnavailable(DependencyError):
    pass


class MigrationError(AuditError):
    """The schema cannot be used or changed safely."""


class IntegrityError(AuditError):
    """The stored log contradicts itself. Writing must stop and an operator must look."""


class SequenceError(IntegrityError):
    """The sequencer found a gap or a duplicate where it expected the next index."""


class UntrustedHeadError(IntegrityError):
    """The newest tree head (signature, log id, stored frontier or the rows it covers)
    fails a check, so the worker will not resume from it."""


class AdoptedRowError(IntegrityError):
    """A row the worker did not write itself (another worker's, or a planted one) does
    not hash to its stored leaf hash, or its leaf names another index."""


class DeadLetterChainError(IntegrityError):
    """The hash chain over audit.dead_letters is broken: a row was changed, removed or
    renumbered. `index` is the chain index where the check failed; `check` names it
    (``index``, ``hash`` or ``start``)."""

    def __init__(self, message: str, *, index: int, check: str) -> None:
        super().__init__(message)
        self.index = index
        self.check = check
