"""Shared fixtures: real PostgreSQL, Redis and moto servers for the whole test session.

Set ``AUDITKIT_TEST_POSTGRES_URL`` / ``AUDITKIT_TEST_REDIS_URL`` to use servers you run
yourself; otherwise the project starts its own (``audit_worker.localenv``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from audit_worker.localenv import (
    MotoServer,
    PostgresServer,
    RedisServer,
    create_database,
    drop_database,
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the session's PostgreSQL server (maintenance database ``postgres``)."""
    external = os.environ.get("AUDITKIT_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    with PostgresServer(fast=True) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis server (db 0)."""
    external = os.environ.get("AUDITKIT_TEST_REDIS_URL")
    if external:
        yield external
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto in server mode, shared by the session (state persists between tests)."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws_kwargs(moto_server: MotoServer) -> dict[str, str]:
    """``boto3.client(service, **aws_kwargs)`` talks to the session's moto server."""
    return moto_server.boto3_kwargs(region="us-east-1")


@pytest.fixture
def fresh_database(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty database on the session server; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = create_database(postgres_url, name)
    try:
        yield url
    finally:
        drop_database(postgres_url, name)


@pytest.fixture
def fresh_redis(redis_url: str) -> str:
    """URL of the session Redis after FLUSHALL (tests run serially)."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_url
