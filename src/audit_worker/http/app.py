"""The worker's HTTP app: health endpoints, Prometheus metrics and the event intake.

Two listeners serve it, each with its own connection limit and timeouts, so producers
can never take the connections the kubelet's probes need:

* health listener, ``AUDIT_HTTP_PORT`` (8080): the health endpoints, ``/metrics`` and
  ``/openapi.json``;
* intake listener, ``AUDIT_INTAKE_PORT`` (8081): ``POST /v1/events`` only.

Each answers 404 for the other's paths.

    GET  /livez               liveness (kubelet)           5 s timeout
    GET  /readyz              readiness (kubelet)          3 s timeout
    GET  /healthz/database    PostgreSQL (monitoring)      10 s timeout
    GET  /healthz/redis       Redis (monitoring)           5 s timeout
    GET  /healthz/external    KMS and S3 (monitoring)      15 s timeout
    GET  /metrics             Prometheus text format
    POST /v1/events           event intake (bearer token)
    GET  /openapi.json        this API, as OpenAPI 3.1 (also checked in: docs/openapi.json)

Health answers are JSON, 200 when healthy and 503 with ``problems`` saying what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from audit_worker.events import AuditEvent
from audit_worker.health import (
    DATABASE_BUDGET,
    EXTERNAL_BUDGET,
    LIVENESS_BUDGET,
    READINESS_BUDGET,
    REDIS_BUDGET,
    CheckResult,
)
from audit_worker.http.intake import IntakeError, intake_router
from audit_worker.metrics import version

if TYPE_CHECKING:
    from audit_worker.service import Service

INTAKE_PATH = "/v1/events"
# What each listener serves (an allow-list: a new route is served nowhere until listed).
HEALTH_PATHS = frozenset({
    "/livez", "/readyz", "/healthz/database", "/healthz/redis", "/healthz/external",
    "/metrics", "/openapi.json",
})
INTAKE_PATHS = frozenset({INTAKE_PATH})


class HealthBody(BaseModel):
    """Every health answer has these fields, plus check-specific details."""

    model_config = ConfigDict(extra="allow")
    status: str = Field(description="ok or fail")
    check: str
    latency_ms: float
    problems: list[str] = Field(description="Empty when healthy; else what is wrong.")


_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": HealthBody, "description": "Healthy."},
    503: {"model": HealthBody, "description": "Unhealthy: `problems` says why."},
}


async def _answer(
    name: str, budget: float, check: Callable[[], Awaitable[CheckResult]]
) -> JSONResponse:
    # The checks keep their own budgets; this is the backstop under the probe timeout.
    try:
        result = await asyncio.wait_for(check(), timeout=budget + 0.4)
    except TimeoutError:
        body = {
            "status": "fail", "check": name, "latency_ms": (budget + 0.4) * 1000,
            "problems": [f"check did not finish within {budget + 0.4:g}s"],
        }
        return JSONResponse(body, status_code=503, headers={"Cache-Control": "no-store"})
    return JSONResponse(
        result.body, status_code=result.status_code, headers={"Cache-Control": "no-store"}
    )


class OnlyPaths:
    """An ASGI app that passes `paths` to `app` and answers 404 for the rest."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], listener: str) -> None:
        self.app = app
        self.paths = paths
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.paths:
            served = ", ".join(sorted(self.paths))
            reply = JSONResponse(
                {"error": "not_found",
                 "message": f"the {self.listener} port serves only {served}"},
                status_code=404,
            )
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="audit-worker",
        version=version(),
        summary="Tamper-evident healthcare audit log worker: health, metrics, event intake.",
        docs_url=None,  # no Swagger UI (it loads scripts from a CDN); use /openapi.json
        redoc_url=None,
    )
    health = service.health
    metrics = service.metrics

    @app.exception_handler(IntakeError)
    async def _intake_error(_request: Request, exc: IntakeError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            # The location names the parameter; the type, not pydantic's message, says
            # what is wrong, so nothing the client sent is echoed.
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('type')}"
            for err in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid_request", "message": "; ".join(problems)}, status_code=422
        )

    @app.middleware("http")
    async def _count_intake(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.url.path == INTAKE_PATH:
            metrics.intake_requests.labels(str(response.status_code)).inc()
        return response

    @app.get("/livez", tags=["health"], responses=_HEALTH_RESPONSES, summary="Liveness")
    async def livez() -> JSONResponse:
        return await _answer("liveness", LIVENESS_BUDGET, health.liveness)

    @app.get("/readyz", tags=["health"], responses=_HEALTH_RESPONSES, summary="Readiness")
    async def readyz() -> JSONResponse:
        return await _answer("readiness", READINESS_BUDGET, health.readiness)

    @app.get(
        "/healthz/database", tags=["health"], responses=_HEALTH_RESPONSES, summary="PostgreSQL"
    )
    async def healthz_database() -> JSONResponse:
        return await _answer("database", DATABASE_BUDGET, health.database)

    @app.get("/healthz/redis", tags=["health"], responses=_HEALTH_RESPONSES, summary="Redis")
    async def healthz_redis() -> JSONResponse:
        return await _answer("redis", REDIS_BUDGET, health.redis_check)

    @app.get(
        "/healthz/external", tags=["health"], responses=_HEALTH_RESPONSES,
        summary="KMS and S3",
    )
    async def healthz_external() -> JSONResponse:
        return await _answer("external", EXTERNAL_BUDGET, health.external)

    @app.get(
        "/metrics",
        tags=["metrics"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(intake_router(service))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary,
                description=__doc__, routes=app.routes,
            )
            event_schema = AuditEvent.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(event_schema.pop("$defs", {}))
            components["AuditEvent"] = event_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def openapi_text() -> str:
    """The OpenAPI document as checked in at docs/openapi.json (stable key order).
    Independent of any setting: built on placeholder URLs, connecting to nothing."""
    from audit_worker.config import WorkerSettings
    from audit_worker.service import Service

    settings = WorkerSettings(
        database_url=SecretStr("postgresql://openapi.invalid/audit"),
        redis_url=SecretStr("redis://openapi.invalid:6379/0"),
    )
    return json.dumps(Service(settings).app.openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m audit_worker.http.app > docs/openapi.json
    sys.stdout.write(openapi_text())
