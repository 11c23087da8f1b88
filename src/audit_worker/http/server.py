"""uvicorn inside the worker's own event loop, without uvicorn's signal handling."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn leaves SIGTERM and SIGINT to the worker, which drains before it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # uvicorn's loggers go through the worker's JSON logging
        access_log=False,  # probes every few seconds would drown everything else
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
        limit_concurrency=256,  # beyond this: 503, instead of queueing without bound
    )
