"""The exporter as the worker's maintenance loop and the CLI run it."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from audit_worker.archive.bundle import BundleError
from audit_worker.archive.exporter import (
    ArchiveExporter,
    ExportRefusedError,
    ExportResult,
    Progress,
)
from audit_worker.config import WorkerSettings
from audit_worker.crypto import TreeHeadSigner, TrustedKeys
from audit_worker.keyring import trusted_keys
from audit_worker.metrics import Metrics
from audit_worker.objectstore import ObjectStore, ObjectStoreError, evidence_store
from audit_worker.resilience import describe_error

log = structlog.stdlib.get_logger("audit_worker.archive")


async def build_exporter(
    settings: WorkerSettings,
    pool: asyncpg.Pool,
    signer: TreeHeadSigner,
    *,
    store: ObjectStore | None = None,
    detach: bool | None = None,
    grace_seconds: float | None = None,
    progress: Progress | None = None,
) -> ArchiveExporter | None:
    """The exporter the settings describe, or None without an evidence store."""
    store = store if store is not None else evidence_store(settings)
    if store is None:
        return None
    pem = await asyncio.to_thread(signer.public_key_pem)
    return ArchiveExporter(
        pool,
        store,
        log_id=settings.log_id,
        signer=signer,
        own_key=TrustedKeys.from_pems([pem]).keys[0],
        trusted=await asyncio.to_thread(trusted_keys, settings, pem),
        grace_seconds=settings.archive_grace_seconds if grace_seconds is None else grace_seconds,
        detach=settings.archive_detach_verified_months if detach is None else detach,
        acquire_timeout=settings.database_acquire_timeout_seconds,
        progress=progress,
    )


async def maintain(
    settings: WorkerSettings,
    pool: asyncpg.Pool,
    signer: TreeHeadSigner,
    metrics: Metrics | None = None,
) -> list[ExportResult]:
    """One maintenance round of the archive. Best effort: a failure is logged (error
    messages name months, indices and objects only), counted in
    ``audit_archive_export_failures_total``, and the next round tries again."""
    reason = "unavailable"
    try:
        exporter = await build_exporter(settings, pool, signer)
        if exporter is None:
            return []
        results = await exporter.run()
    except BundleError as exc:
        reason = "not_verified"
        log.error("archive export failed verification: the month stays in the hot database",
                  error=str(exc), alert="audit_archive_export_failing")
    except ExportRefusedError as exc:
        reason = "refused"
        log.error("archive export refused: the month stays in the hot database",
                  error=str(exc), alert="audit_archive_export_failing")
    except (ObjectStoreError, OSError, asyncpg.PostgresError, TimeoutError) as exc:
        log.warning("archive export not done; next round retries", error=describe_error(exc))
    except Exception as exc:  # a bug must not end the maintenance loop
        log.error("archive export failed unexpectedly; next round retries",
                  error=describe_error(exc), alert="audit_archive_export_failing")
    else:
        if metrics is not None:
            for result in results:
                if result.status in ("exported", "detached"):
                    metrics.archive_months.labels(result.status).inc()
        return results
    if metrics is not None:
        metrics.archive_failures.labels(reason).inc()
    return []
