"""The six-year archive: closed months of the log exported as self-verifying bundles to the
S3 Object Lock bucket (`bundle`: the format and its verification, pure; `exporter`: the
export from PostgreSQL; `reader`: verification of the whole archive against the live log,
and archived leaves for proofs)."""

from audit_worker.archive.bundle import (
    FORMAT,
    PART_ROWS,
    BundleError,
    BundleWriter,
    VerifiedBundle,
    verify_bundle,
)
from audit_worker.archive.exporter import ArchiveExporter, ExportRefusedError, ExportResult

__all__ = [
    "FORMAT",
    "PART_ROWS",
    "ArchiveExporter",
    "BundleError",
    "BundleWriter",
    "ExportRefusedError",
    "ExportResult",
    "VerifiedBundle",
    "verify_bundle",
]
