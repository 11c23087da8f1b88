"""Which PostgreSQL errors are retried, isolated to one entry, or halt the writer."""

from __future__ import annotations

import asyncpg
import pytest

from audit_worker.errors import ConfigurationError, SequenceError
from audit_worker.resilience import (
    classify,
    configuration_hint,
    postgres_error_kind,
    sqlstate,
)
from audit_worker.worker import Worker

E = asyncpg.exceptions


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (E.ConnectionFailureError(""), "transient"),  # 08006
        (E.SerializationError(""), "transient"),  # 40001
        (E.DeadlockDetectedError(""), "transient"),  # 40P01
        (E.TooManyConnectionsError(""), "transient"),  # 53300
        (E.DiskFullError(""), "transient"),  # 53100
        (E.AdminShutdownError(""), "transient"),  # 57P01
        (E.CannotConnectNowError(""), "transient"),  # 57P03
        (E.QueryCanceledError(""), "transient"),  # 57014
        (E.LockNotAvailableError(""), "transient"),  # 55P03
        (E.ReadOnlySQLTransactionError(""), "transient"),  # 25006
        (E.IdleInTransactionSessionTimeoutError(""), "transient"),  # 25P03
        (asyncpg.InterfaceError(""), "transient"),
        (E.CharacterNotInRepertoireError(""), "entry"),  # 22021
        (E.StringDataRightTruncationError(""), "entry"),  # 22001
        (E.CheckViolationError(""), "entry"),  # 23514
        (E.UniqueViolationError(""), "entry"),  # 23505
        (E.NotNullViolationError(""), "entry"),  # 23502
        (E.ProgramLimitExceededError(""), "entry"),  # 54000
        (E.InsufficientPrivilegeError(""), "halt"),  # 42501
        (E.InvalidPasswordError(""), "halt"),  # 28P01
        (E.InvalidAuthorizationSpecificationError(""), "halt"),  # 28000
        (E.InvalidCatalogNameError(""), "halt"),  # 3D000
        (E.InvalidSchemaNameError(""), "halt"),  # 3F000
        (E.UndefinedTableError(""), "halt"),  # 42P01
        (E.DatabaseDroppedError(""), "halt"),  # 57P04: not "operator intervention"
        (E.InternalServerError(""), "halt"),  # XX000: not planned for
        (E.RaiseError(""), "halt"),  # P0001
        (ValueError("not a database error"), None),
    ],
)
def test_every_sqlstate_class_has_one_kind(exc: BaseException, kind: str | None) -> None:
    assert postgres_error_kind(exc) == kind


def test_only_transient_errors_are_retried() -> None:
    assert classify(E.SerializationError(""), "postgres") == "postgres"
    assert classify(E.CheckViolationError(""), "postgres") is None
    assert classify(E.InsufficientPrivilegeError(""), "postgres") is None
    assert classify(ConnectionRefusedError(111, "refused"), "postgres") == "postgres"


def test_splitting_a_batch_is_only_for_errors_an_entry_may_cause() -> None:
    at_fault = Worker._entry_may_be_at_fault
    assert at_fault(E.CheckViolationError(""))
    assert at_fault(ValueError("an unforeseen bug"))
    for innocent in (
        E.SerializationError(""), E.InsufficientPrivilegeError(""), OSError("reset"),
        TimeoutError(), SequenceError("gap"), ConfigurationError("log id"),
    ):
        assert not at_fault(innocent), innocent


def test_every_halting_sqlstate_comes_with_a_fix() -> None:
    assert "GRANT audit_writer" in configuration_hint("42501")
    assert "AUDIT_DATABASE_URL" in configuration_hint("28P01")
    assert "does not exist" in configuration_hint("3D000")
    assert "look up the SQLSTATE" in configuration_hint("XX000")
    assert sqlstate(E.CheckViolationError("")) == "23514"
    assert sqlstate(ValueError()) is None
