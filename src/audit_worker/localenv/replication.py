"""A PostgreSQL primary and a real streaming replica on this machine, for DR drills.

Each server is a `Node`: a `PostgresServer` whose directories are fixed under one base
directory, so that a later process (another ``auditctl`` command) finds it again from the
paths in a state file and can stop, promote or rewind it. Nothing here is simulated:

* `Node.clone_from` takes a base backup of the primary with ``pg_basebackup -R`` (streamed
  WAL, ``standby.signal`` and ``primary_conninfo`` written), so the node starts as a hot
  standby that streams from the primary.
* `promote` runs ``SELECT pg_promote(wait => true)`` on the standby.
* `Node.rewind_from` runs ``pg_rewind -R`` against the new primary, so that an old primary
  (stopped cleanly) becomes a standby of the new one: the failback path. The servers run
  with ``wal_log_hints = on`` because PostgreSQL's ``initdb`` here has no data checksums
  and ``pg_rewind`` needs one of the two.
* `replay_position`, `current_position` and `wait_replayed` compare WAL positions (LSNs)
  to know when a standby has caught up.

PostgreSQL runs as ``nobody`` when we are root (see `PostgresServer.run_as`): the base
directory must be traversable by that account.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from audit_worker.localenv import servers
from audit_worker.localenv.servers import HOST, PostgresServer

__all__ = [
    "Node",
    "ReplicationStatus",
    "current_position",
    "detach",
    "in_recovery",
    "lsn_to_int",
    "promote",
    "replay_position",
    "replication_status",
    "wait_replayed",
]

CONNECT_TIMEOUT = 5.0


def lsn_to_int(lsn: object) -> int:
    """A pg_lsn as a byte position: asyncpg decodes it to an int already; the text form
    ``'0/3000148'`` is accepted too."""
    if isinstance(lsn, int):
        return lsn
    high, _, low = str(lsn).partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def detach(server: object) -> None:
    """Let `server` outlive this process.

    `audit_worker.localenv.servers` stops every server it started when the interpreter
    exits (a safety net for tests). The local platform's servers must survive the command
    that started them, so they are taken off that list; ``auditctl local down`` stops them.
    """
    servers._LIVE.discard(server)


class Node(PostgresServer):
    """A PostgreSQL server with fixed directories under ``base_dir``.

    ``base_dir/data`` is the data directory, ``base_dir/sock`` the socket directory and
    ``base_dir/postgresql.log`` the server log, whichever process created them. Nothing is
    removed on stop (``keep=True``): the data is the point.
    """

    def __init__(self, base_dir: Path, port: int, *, fast: bool = True) -> None:
        base = base_dir.resolve()
        super().__init__(data_dir=base / "data", port=port, fast=fast, keep=True)
        (base / "sock").mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self._chown_dir(base)
        self._chown_dir(base / "sock")
        # PostgresServer keeps its socket dir and log in a temporary "base" dir of its own
        # choosing; a fixed one is what lets another process find this server again.
        self._base = base

    def _chown_dir(self, path: Path) -> None:
        run_as = self._run_as
        if run_as is not None:
            os.chown(path, run_as.uid, run_as.gid)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def conninfo(self) -> str:
        """libpq connection string (for ``primary_conninfo`` and ``pg_rewind``)."""
        return f"host={HOST} port={self.port} user=postgres dbname=postgres"

    def settings(self) -> dict[str, str]:
        settings = super().settings()
        settings.update(
            wal_log_hints="on",  # pg_rewind needs it (or data checksums)
            wal_receiver_status_interval="'1s'",
            hot_standby_feedback="on",
        )
        return settings

    def has_data(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_standby(self) -> bool:
        """True when the data directory will start as a standby (``standby.signal``)."""
        return (self.data_dir / "standby.signal").exists()

    def clone_from(self, primary: Node, *, application_name: str = "replica") -> float:
        """Make this (stopped, empty) node a streaming standby of `primary`; return seconds.

        ``pg_basebackup -R -X stream -c fast`` copies the running primary and writes
        ``standby.signal`` and ``primary_conninfo``; the node is then started.
        """
        if self.is_running():
            raise RuntimeError(f"node on port {self.port} is running: stop it before cloning")
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        started = time.monotonic()
        self._run(
            [
                "pg_basebackup",
                "--dbname", f"{primary.conninfo} application_name={application_name}",
                "-D", self.data_dir,
                "-X", "stream",
                "-R",
                "-c", "fast",
                *(["--no-sync"] if self.fast else []),
            ],
            timeout=300,
        )
        os.chmod(self.data_dir, 0o700)
        self.start()
        return time.monotonic() - started

    def rewind_from(self, source: Node, *, application_name: str = "replica") -> str:
        """Turn this old primary into a standby of `source` with ``pg_rewind -R``.

        The node must have been stopped cleanly. Returns pg_rewind's own account (it says
        "no rewind required" when the timelines had not diverged). The node is then started
        and streams from `source`.
        """
        if self.is_running():
            self.stop(cleanup=False)
        # A freshly promoted standby updates its control file's timeline only at its next
        # checkpoint; without one pg_rewind sees "the same timeline" and rewinds nothing.
        self._run(["psql", "-X", "-q", "-d", source.conninfo, "-c", "CHECKPOINT"], timeout=120)
        result = self._run(
            [
                "pg_rewind",
                "--target-pgdata", self.data_dir,
                "--source-server", f"{source.conninfo} application_name={application_name}",
                "--write-recovery-conf",
                "--progress",
                *(["--no-sync"] if self.fast else []),
            ],
            timeout=300,
        )
        self.start()
        return (result.stdout + result.stderr).strip()


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def in_recovery(url: str) -> bool:
    """True on a standby (``pg_is_in_recovery()``)."""
    return bool(await _fetchval(url, "SELECT pg_is_in_recovery()"))


async def current_position(url: str) -> int:
    """The WAL position a standby must reach to have everything the primary wrote.

    The *insert* position: with ``synchronous_commit = off`` a commit can sit in the WAL
    buffers past ``pg_current_wal_lsn()`` (the write position) for a moment."""
    return lsn_to_int(await _fetchval(url, "SELECT pg_current_wal_insert_lsn()"))


async def replay_position(url: str) -> int | None:
    """The WAL position a standby has replayed, or None when it is not a standby."""
    value = await _fetchval(url, "SELECT pg_last_wal_replay_lsn()")
    return None if value is None else lsn_to_int(value)


async def wait_replayed(url: str, position: int, *, timeout: float = 60.0) -> float:
    """Wait until the standby at `url` has replayed up to `position`; return seconds.

    Raises TimeoutError naming both positions.
    """
    started = time.monotonic()
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        while True:
            value = await conn.fetchval("SELECT pg_last_wal_replay_lsn()")
            replayed = None if value is None else lsn_to_int(value)
            if replayed is not None and replayed >= position:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"standby replayed up to {replayed} after {timeout:g}s; want {position}"
                )
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def promote(url: str, *, timeout: int = 60) -> float:
    """``SELECT pg_promote(wait => true)`` on a standby; return seconds until writable."""
    started = time.monotonic()
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        done = await conn.fetchval("SELECT pg_promote(true, $1)", timeout)
        if not done:
            raise TimeoutError(f"pg_promote did not finish within {timeout}s")
        while await conn.fetchval("SELECT pg_is_in_recovery()"):
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    return time.monotonic() - started


@dataclass(frozen=True)
class ReplicationStatus:
    """What the primary's ``pg_stat_replication`` says about one standby."""

    application_name: str
    state: str
    lag_bytes: int
    replay_lag_seconds: float | None


async def replication_status(primary_url: str) -> list[ReplicationStatus]:
    conn = await asyncpg.connect(primary_url, timeout=CONNECT_TIMEOUT)
    try:
        rows = await conn.fetch(
            "SELECT application_name, state,"
            " coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint AS lag,"
            " extract(epoch FROM replay_lag)::float8 AS replay_lag"
            " FROM pg_stat_replication ORDER BY application_name"
        )
    finally:
        await conn.close()
    return [
        ReplicationStatus(r["application_name"], r["state"], int(r["lag"]), r["replay_lag"])
        for r in rows
    ]
