"""Local servers (PostgreSQL, Redis, moto) for tests and the demo environment."""

from audit_worker.localenv.servers import (
    LocalEnvironment,
    MotoServer,
    PostgresServer,
    RedisServer,
    create_database,
    database_url,
    drop_database,
    find_pg_bindir,
    find_redis_server,
    free_port,
)

__all__ = [
    "LocalEnvironment",
    "MotoServer",
    "PostgresServer",
    "RedisServer",
    "create_database",
    "database_url",
    "drop_database",
    "find_pg_bindir",
    "find_redis_server",
    "free_port",
]
