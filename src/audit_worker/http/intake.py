"""``POST /v1/events``: audit events over HTTP for producers that are not Python.

The body is one event (a JSON object) or a batch (a JSON array of objects). Every event is
validated exactly as the worker validates it (`audit_worker.events.parse_event`), and the
answer lists each one: ``accepted`` (written to the stream, with its stream id, or
spooled in PostgreSQL while Redis is unreachable: ``spooled: true``, no stream id),
``rejected`` (with field, value class, rule and message; never the value), or
``not_written`` (valid, but its batch was refused). Two modes, chosen by ``?mode=``:

* ``atomic`` (default): all or nothing. One rejected event refuses the whole batch with
  422 and nothing is written.
* ``partial``: the valid events are written and the others reported; 202 when all were
  accepted, 207 when only some were, 422 when none were.

Accepted events go to the Redis stream in one MULTI/EXEC transaction, so a request is
never half-written. When that fails, or the Redis circuit breaker is open, they go to the
spool in PostgreSQL instead (``audit.intake_spool``, sealed with AES-GCM, one transaction),
and the active worker moves them into the log once Redis is back. The worker stores them;
``event_id`` is the idempotency key, so retrying a request after a timeout never stores an
event twice.

Errors, each with ``{"error": code, "message": ...}``: 401 (missing or wrong bearer token),
408 (the body did not arrive within ``intake_body_timeout_seconds``; the connection is
closed), 413 (body over ``intake_max_body_bytes`` or more than ``intake_max_events``
events), 415 (not ``application/json``), 422 (not JSON, not an object or array, empty
batch, invalid events in atomic mode), 503 (intake disabled because no token is
configured, or Redis unreachable and the spool too, or the worker not started yet;
nothing was written, retry later). With ``intake_max_connections``
connections open, the listener itself answers 503 (plain text) and closes the connection.

Served on the intake listener (``AUDIT_INTAKE_PORT``, 8081), never on the health port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, SecretStr
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect

from audit_worker.db.spool import IntakeSpool, seal
from audit_worker.events import AuditEvent, Rejection, parse_event, rejection, value_class
from audit_worker.resilience import BreakerOpen, BreakerState, describe_error

if TYPE_CHECKING:
    from audit_worker.service import Service

Mode = Literal["atomic", "partial"]
EVENT_FIELD = "event"
# Longest wait for the spool's pooled connection and each statement: a producer waiting on
# a stuck database is better told 503 (and retries) than held until its own timeout.
SPOOL_TIMEOUT_SECONDS = 5.0
REFUSAL_LOG_SECONDS = 10.0  # one error line per interval while both are down, not per request
log = structlog.stdlib.get_logger("audit_worker")


class IntakeError(Exception):
    """An HTTP error answered as ``{"error": code, "message": ...}``."""

    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.error, "message": self.message},
            status_code=self.status,
            headers=self.headers,
        )


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What is wrong and how to fix it.")


class RejectionBody(BaseModel):
    field: str = Field(description="Dotted path of the offending field, or (event).")
    value_class: str = Field(description="Type and size of the value; never the value.")
    rule: str = Field(description="The validation rule that failed.")
    message: str


class EventResult(BaseModel):
    index: int = Field(description="Position in the request (0 for a single event).")
    event_id: str | None = Field(description="The event's id, when it has a valid one.")
    status: Literal["accepted", "rejected", "not_written"]
    stream_id: str | None = Field(
        default=None,
        description="Redis stream entry id of an accepted event; null when it was spooled.",
    )
    spooled: bool = Field(
        default=False,
        description="True when the event was accepted into the PostgreSQL spool because "
        "Redis was unreachable; the worker moves it into the log once Redis is back.",
    )
    rejection: RejectionBody | None = None


class IntakeResponse(BaseModel):
    mode: Mode
    written: bool = Field(description="True when at least one event was written.")
    accepted: int
    rejected: int
    results: list[EventResult]


def token_digests(tokens: Sequence[SecretStr]) -> list[bytes]:
    return [hashlib.sha256(t.get_secret_value().encode()).digest() for t in tokens]


def token_matches(presented: str, digests: Sequence[bytes]) -> bool:
    """Constant-time comparison against every configured token (digests of equal
    length, no early exit), so timing reveals neither a token nor which one matched."""
    candidate = hashlib.sha256(presented.encode()).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(candidate, digest)
    return matched


def _event_id(item: Any) -> str | None:
    if isinstance(item, dict) and isinstance(item.get("event_id"), str):
        try:
            return str(uuid.UUID(item["event_id"]))
        except ValueError:
            return None
    return None


def validate_items(
    items: list[Any], *, max_future_skew: float
) -> list[tuple[bytes, AuditEvent | Rejection, str | None]]:
    """(serialised event, outcome, event id) for each item; pure."""
    out: list[tuple[bytes, AuditEvent | Rejection, str | None]] = []
    for item in items:
        try:
            raw = orjson.dumps(item)
        except orjson.JSONEncodeError:
            # orjson reads 1,024 levels of nesting but writes only 254.
            out.append((b"", rejection("(event)", value_class(item), "too_deep"), None))
            continue
        outcome = parse_event(raw, max_future_skew=max_future_skew)
        event_id = str(outcome.event_id) if isinstance(outcome, AuditEvent) else _event_id(item)
        out.append((raw, outcome, event_id))
    return out


def parse_body(body: bytes, max_events: int) -> tuple[list[Any], bool]:
    """The items of a request body and whether it was a batch; raises `IntakeError`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson's message may describe the bytes it choked on: a fixed text instead.
        raise IntakeError(422, "json_invalid", "the body is not valid UTF-8 JSON") from None
    if isinstance(data, dict):
        return [data], False
    if not isinstance(data, list):
        raise IntakeError(
            422, "body_not_event_or_array",
            "the body must be one event (a JSON object) or a batch (a JSON array)",
        )
    if not data:
        raise IntakeError(422, "empty_batch", "the batch holds no events")
    if len(data) > max_events:
        raise IntakeError(
            413, "too_many_events",
            f"the batch holds {len(data)} events; the limit is {max_events} per request",
        )
    return data, True


def _media_type_ok(content_type: str | None) -> bool:
    if not content_type:
        return False
    main, *params = (part.strip().lower() for part in content_type.split(";"))
    if main != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, refusing more than `limit` bytes before reading them all, and a body that
    takes longer than `timeout` seconds in all (uvicorn has no body timeout: a client
    sending a byte a second would otherwise hold its connection for days)."""
    declared = request.headers.get("content-length")
    too_large = IntakeError(
        413, "body_too_large", f"the body is larger than the limit of {limit} bytes"
    )
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise IntakeError(400, "bad_content_length", "Content-Length is not a number") from None

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except ClientDisconnect:
        # Nobody is left to answer; say so in one fixed line rather than a traceback.
        raise IntakeError(400, "client_disconnected", "the client went away") from None
    except TimeoutError:
        raise IntakeError(
            408, "body_timeout",
            f"the body did not arrive within {timeout:g}s; send it at once",
            {"Connection": "close"},  # the rest of the body is never read
        ) from None


_REQUEST_BODY_DOC = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/AuditEvent"},
                    {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/AuditEvent"},
                        "minItems": 1,
                    },
                ]
            }
        }
    },
}
_ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "Missing or invalid bearer token."),
        (408, "The body did not arrive within the intake's body timeout."),
        (413, "Body or batch over the configured limits."),
        (415, "Content-Type is not application/json."),
        (503, "Intake disabled (no token configured), or the stream and the spool are both "
              "unreachable, or the worker is not started yet: nothing was written (at the "
              "connection limit: plain text from the listener)."),
    )
}


def intake_router(service: Service) -> APIRouter:
    settings = service.settings
    digests = token_digests(settings.intake_tokens)
    bearer = HTTPBearer(auto_error=False, description="One of AUDIT_INTAKE_TOKENS.")
    router = APIRouter()
    metrics = service.metrics

    def authenticate(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not digests:
            raise IntakeError(
                503, "intake_disabled",
                "HTTP intake is disabled: no token is configured (AUDIT_INTAKE_TOKENS)",
            )
        challenge = {"WWW-Authenticate": 'Bearer realm="audit-intake"'}
        if credentials is None:
            raise IntakeError(
                401, "missing_token", "send Authorization: Bearer <token>", challenge
            )
        if not token_matches(credentials.credentials, digests):
            challenge["WWW-Authenticate"] += ', error="invalid_token"'
            raise IntakeError(401, "invalid_token", "the bearer token is not valid", challenge)

    spooling = [False]  # whether the last write went to the spool (logged on change)
    refusal_logged = [-math.inf]  # when a double outage was last logged (rate-limited)

    async def spool(events: list[tuple[uuid.UUID, bytes]], cause: BaseException) -> None:
        """Seal (event id, serialised event) pairs and spool them in one PostgreSQL
        transaction; `IntakeError` 503 when the worker is not assembled yet or PostgreSQL
        fails too (nothing written)."""
        worker, parts = service.worker, service.parts

        def unavailable(also: str) -> IntakeError:
            return IntakeError(
                503, "stream_unavailable",
                f"the event stream is unreachable ({describe_error(cause)}) and {also}; "
                "nothing was written, retry later (event_id makes retries safe)",
                {"Retry-After": "1"},
            )

        if worker is None or parts is None:
            raise unavailable("the worker has not started yet (no spool)")
        try:
            # May rotate the data key: a blocking key-service call, as in `Worker.triage`.
            key = worker.data_keys.current()
            sealed = [(eid, seal(worker.cipher, key, eid, raw)) for eid, raw in events]
            worker.data_keys.note_use(len(sealed))  # the key's nonce budget counts these too
            await IntakeSpool(parts.pool, acquire_timeout=SPOOL_TIMEOUT_SECONDS).insert(
                sealed, key, timeout=SPOOL_TIMEOUT_SECONDS, purpose=worker.data_keys.purpose
            )
        except Exception as exc:
            if time.monotonic() - refusal_logged[0] >= REFUSAL_LOG_SECONDS:
                refusal_logged[0] = time.monotonic()
                log.error(
                    "intake refuses events: the stream and the spool are both unreachable",
                    stream_error=describe_error(cause), spool_error=describe_error(exc),
                )
            raise unavailable(f"the spool failed too ({describe_error(exc)})") from None
        service.note_spooled(len(sealed))
        if not spooling[0]:
            spooling[0] = True
            log.warning(
                "stream unreachable: the intake spools accepted events in PostgreSQL",
                error=describe_error(cause),
            )

    @router.post(
        "/v1/events",
        status_code=202,
        response_model=IntakeResponse,
        summary="Submit one audit event or a batch",
        description=__doc__ or "",
        openapi_extra={"requestBody": _REQUEST_BODY_DOC},
        responses={
            202: {"description": "Every event accepted: written to the stream, or, while "
                  "Redis is unreachable, to the PostgreSQL spool (spooled: true)."},
            207: {"model": IntakeResponse, "description": "Partial mode: some rejected."},
            422: {"model": IntakeResponse | ErrorBody, "description": "Invalid body or events."},
            **_ERRORS_DOC,
        },
        dependencies=[Depends(authenticate)],
        tags=["intake"],
    )
    async def post_events(
        request: Request,
        mode: Annotated[
            Mode,
            Query(description="atomic: all or nothing (default). partial: write the valid ones."),
        ] = "atomic",
    ) -> JSONResponse:
        if not _media_type_ok(request.headers.get("content-type")):
            raise IntakeError(
                415, "unsupported_media_type", "send Content-Type: application/json (UTF-8)"
            )
        body = await read_limited(
            request, settings.intake_max_body_bytes, settings.intake_body_timeout_seconds
        )
        items, _batch = parse_body(body, settings.intake_max_events)
        checked = validate_items(items, max_future_skew=settings.max_future_skew_seconds)
        valid = [i for i, (_, outcome, _) in enumerate(checked) if isinstance(outcome, AuditEvent)]
        rejected = len(checked) - len(valid)
        write = valid if (mode == "partial" or rejected == 0) else []
        stream_ids: dict[int, str] = {}
        spooled: set[int] = set()
        if write:
            breaker = service.breakers["redis"]
            failure: BaseException | None = None
            if breaker.state is BreakerState.OPEN:
                # Known down: spool at once instead of waiting for a connect timeout.
                failure = BreakerOpen("redis", breaker.retry_in())
            else:
                try:
                    async with service.redis.pipeline(transaction=True) as pipe:
                        for i in write:
                            pipe.xadd(settings.stream, {EVENT_FIELD: checked[i][0]})
                        replies = await pipe.execute()
                except (RedisError, OSError) as exc:
                    failure = exc
                else:
                    for i, reply in zip(write, replies, strict=True):
                        stream_ids[i] = reply.decode() if isinstance(reply, bytes) else str(reply)
                    if spooling[0]:
                        spooling[0] = False
                        log.warning("intake writes to the stream again")
            if failure is not None:
                await spool(
                    [(o.event_id, raw) for raw, o, _ in (checked[i] for i in write)
                     if isinstance(o, AuditEvent)],
                    failure,
                )
                spooled.update(write)
        results: list[dict[str, Any]] = []
        for index, (_, outcome, event_id) in enumerate(checked):
            entry: dict[str, Any] = {"index": index, "event_id": event_id}
            if isinstance(outcome, Rejection):
                entry.update(status="rejected", rejection=outcome.as_dict())
            elif index in stream_ids:
                entry.update(status="accepted", stream_id=stream_ids[index], spooled=False)
            elif index in spooled:
                entry.update(status="accepted", stream_id=None, spooled=True)
            else:
                entry["status"] = "not_written"
            results.append(entry)
        accepted = len(stream_ids) + len(spooled)
        if accepted and rejected:
            status = 207
        elif accepted:
            status = 202
        else:
            status = 422
        metrics.intake_events.labels("accepted").inc(len(stream_ids))
        metrics.intake_events.labels("spooled").inc(len(spooled))
        metrics.intake_events.labels("rejected").inc(rejected)
        return JSONResponse(
            {
                "mode": mode, "written": accepted > 0, "accepted": accepted,
                "rejected": rejected, "results": results,
            },
            status_code=status,
        )

    return router
