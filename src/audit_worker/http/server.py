"""uvicorn inside the worker's own event loop, without uvicorn's signal handling.

The worker runs two of these servers, each on its own socket with its own limits (see
README, "Running the worker in production"):

* the **health listener** (``AUDIT_HTTP_PORT``): probes, ``/metrics``, ``/openapi.json``;
* the **intake listener** (``AUDIT_INTAKE_PORT``): ``POST /v1/events``.

uvicorn's ``limit_concurrency`` counts a server's open connections, so with one server a
few hundred idle or slow producers made every probe answer 503 and the kubelet killed a
healthy worker. With two servers they can only exhaust the intake's own limit.

uvicorn has no deadline for a request head (a client may send one header byte a second
for ever), so `GuardedH11Protocol` adds one. The body deadline is the app's
(`audit_worker.http.intake.read_limited` answers 408).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = logging.getLogger("audit_worker.http")


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener allows a client; every wait is bounded.

    max_connections: open connections; a request arriving beyond it gets 503 and the
        connection is closed (uvicorn ``limit_concurrency``).
    header_timeout: seconds from accepting a connection to a complete request head, else
        the connection is closed without an answer (slowloris, idle sockets).
    keep_alive: seconds a connection may sit idle after a response (uvicorn
        ``timeout_keep_alive``); the next head is then due within keep_alive +
        header_timeout of that response.
    max_head_bytes: bytes a request head may reach while still incomplete; beyond, 400
        and closed (h11 ``max_incomplete_event_size``: bounds what a slow head can make
        the worker buffer).
    backlog: connections the kernel queues before the loop accepts them; beyond, new
        ones wait in SYN retries (listen(2) backlog).
    """

    max_connections: int
    header_timeout: float
    keep_alive: int
    max_head_bytes: int
    backlog: int


# The health listener's clients are the kubelet and Prometheus: a handful at a time, each
# request tiny. The limits are constants, not settings, because nothing should need more.
HEALTH_LIMITS = ListenerLimits(
    max_connections=64, header_timeout=5.0, keep_alive=5, max_head_bytes=8 * 1024, backlog=64
)
# A bearer token plus ordinary headers fits in a few KiB; 16 KiB is h11's own default.
INTAKE_MAX_HEAD_BYTES = 16 * 1024


class QuietServer(uvicorn.Server):
    """uvicorn leaves SIGTERM and SIGINT to the worker, which drains before it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class GuardedConfig(uvicorn.Config):
    """A uvicorn config that carries the listener's request-head deadline."""

    def __init__(self, app: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for every request head.

    Armed when the connection is accepted and after every response; cancelled once a
    head is parsed (the request then belongs to the app and its own timeouts). A client
    that has not finished its head by then is disconnected.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout: float = getattr(config, "header_timeout", HEALTH_LIMITS.header_timeout)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request head was parsed
            self._head_arrived()

    def on_response_complete(self) -> None:
        # Armed first: super() may parse a pipelined head at once, which cancels it.
        self._await_head(self.timeout_keep_alive + self.header_timeout)
        super().on_response_complete()

    def _await_head(self, seconds: float) -> None:
        self._head_arrived()
        self._head_deadline = self.loop.call_later(seconds, self._head_overdue)

    def _head_arrived(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            # No answer is possible: h11 has no request to answer until a head is parsed.
            # Debug only: under a flood this would be a line per socket.
            log.debug("request head not complete in time: connection closed")
            self.transport.close()


def make_config(app: Any, limits: ListenerLimits = HEALTH_LIMITS) -> uvicorn.Config:
    return GuardedConfig(
        app,
        header_timeout=limits.header_timeout,
        http=GuardedH11Protocol,  # h11, never httptools: the head limits are h11's
        ws="none",  # no WebSocket endpoints; an upgrade request is plain HTTP
        lifespan="off",
        log_config=None,  # uvicorn's loggers go through the worker's JSON logging
        access_log=False,  # probes every few seconds would drown everything else
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=limits.keep_alive,
        timeout_graceful_shutdown=2,
        limit_concurrency=limits.max_connections,  # beyond: 503, never an unbounded queue
        backlog=limits.backlog,
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )
