"""Chaos harness: real worker processes, real servers, a steady producer that survives
outages, and an exact account of every stream entry at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit_worker.crypto import LocalSigner
from audit_worker.localenv import free_port
from audit_worker.localenv.workload import malformed_event, synthetic_event
from audit_worker.verify import verify_log

STREAM = "audit:events"
GROUP = "audit-workers"
ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`python -m audit_worker.cli run` with its own HTTP port and log file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, **extra: str) -> None:
        self.name = name
        self.port = free_port()
        self.env = {
            **os.environ, **env, "AUDIT_CONSUMER_NAME": name,
            "AUDIT_HTTP_HOST": "127.0.0.1", "AUDIT_HTTP_PORT": str(self.port),
            "AUDIT_INTAKE_PORT": "0", **extra,  # several workers: 8081 once at most
        }
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._http: httpx.AsyncClient | None = None

    def start(self) -> WorkerProcess:
        self.started_at = time.time()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "audit_worker.cli", "run", "--create-keys"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _raw_get(self, path: str, timeout: float) -> httpx.Response:
        if self._http is None:
            self._http = httpx.AsyncClient()
        return await self._http.get(self.url + path, timeout=timeout)

    async def get(self, path: str, timeout: float = 5) -> httpx.Response:
        try:
            return await self._raw_get(path, timeout)
        except httpx.HTTPError as exc:
            code = self.proc.poll() if self.proc is not None else None
            raise AssertionError(
                f"{self.name} did not answer {path} ({exc!r}; exit code {code}):\n"
                + self.log_tail(60)
            ) from exc

    async def wait_ready(self, timeout: float = 60) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self._raw_get("/readyz", 3)).status_code == 200:
                    return time.perf_counter() - started
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready in {timeout}s: {self.log_tail()}")

    async def metric(self, name: str) -> float:
        text = (await self.get("/metrics")).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else float("nan")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, grace: float = 30) -> tuple[int, float]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        self.proc.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        code = await asyncio.to_thread(self.proc.wait, grace)
        return code, time.perf_counter() - started

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Producer:
    """XADDs at `rate` per second, every `malformed_every`-th entry malformed; retries the
    same payload (same event_id) when Redis fails, so ambiguity becomes a replay."""

    redis_url: str
    rate: float = 300
    malformed_every: int = 10
    good_ids: set[str] = field(default_factory=set)
    malformed: int = 0
    failures: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _n: int = 0

    def start(self) -> Producer:
        self._task = asyncio.create_task(self._run())
        return self

    async def burst(self, count: int) -> None:
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            entries = [self._next() for _ in range(count)]
            async with client.pipeline(transaction=False) as pipe:
                for fields, _ in entries:
                    pipe.xadd(STREAM, fields)
                await pipe.execute()
            self._note(entries)
        finally:
            await client.aclose()

    def _next(self) -> tuple[dict[str, bytes], str | None]:
        n = self._n
        self._n += 1
        if self.malformed_every and n % self.malformed_every == self.malformed_every - 1:
            return {"event": malformed_event(n), "kind": b"bad"}, None
        event = synthetic_event(n)
        return {"event": json.dumps(event).encode(), "kind": b"good"}, event["event_id"]

    def _note(self, entries: list[tuple[dict[str, bytes], str | None]]) -> None:
        for _, event_id in entries:
            if event_id is None:
                self.malformed += 1
            else:
                self.good_ids.add(event_id)

    async def _run(self) -> None:
        client = aioredis.Redis.from_url(
            self.redis_url, socket_timeout=2, socket_connect_timeout=1
        )
        tick = 0.05
        try:
            while not self._stop.is_set():
                entries = [self._next() for _ in range(max(1, int(self.rate * tick)))]
                while True:
                    try:
                        async with client.pipeline(transaction=False) as pipe:
                            for fields, _ in entries:
                                pipe.xadd(STREAM, fields)
                            await pipe.execute()
                        break
                    except (RedisError, OSError):
                        self.failures += 1
                        await asyncio.sleep(0.05)
                self._note(entries)
                await asyncio.sleep(tick)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def count(db: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit.events"))
    finally:
        await conn.close()


async def first_commit_after(db: str, moment: float, timeout: float = 30) -> float:
    """Seconds from `moment` (wall clock) to the first event the log recorded after it."""
    at = datetime.fromtimestamp(moment, UTC)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            conn = await asyncpg.connect(db, timeout=2)
            try:
                first = await conn.fetchval(
                    "SELECT min(recorded) FROM audit.events WHERE recorded > $1", at
                )
            finally:
                await conn.close()
            if first is not None:
                return (first - at).total_seconds()
        except (OSError, asyncpg.PostgresError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"no commit within {timeout}s after the dependency returned")


async def drained(db: str, redis_url: str, timeout: float = 60) -> None:
    """Wait until every stream entry is either in the log or a dead letter."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            total = await client.xlen(STREAM)
            pending = (await client.xpending(STREAM, GROUP))["pending"]
            group = (await client.xinfo_groups(STREAM))[0]
            last = group["last-delivered-id"].decode()
            newest = (await client.xrevrange(STREAM, count=1))
            if total and pending == 0 and newest and newest[0][0].decode() == last:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("stream not drained in time")
    finally:
        await client.aclose()


@dataclass
class Account:
    entries: int
    good_entries: int
    bad_entries: int
    stored: int
    replays: int
    dead_lettered: int
    verified: bool

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


async def account(db: str, redis_url: str, key_dir: Path, producer: Producer) -> Account:
    """Every stream entry accounted for: good ones stored exactly once, malformed ones
    dead-lettered, nothing else in the log, the log verifies."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        rows = await client.xrange(STREAM)
    finally:
        await client.aclose()
    good: list[str] = []
    bad: set[str] = set()
    for entry_id, fields in rows:
        if fields.get(b"kind") == b"bad":
            bad.add(entry_id.decode())
        else:
            good.append(json.loads(fields[b"event"])["event_id"])
    conn = await asyncpg.connect(db)
    try:
        stored = [str(r[0]) for r in await conn.fetch("SELECT event_id FROM audit.events")]
        indices = [r[0] for r in await conn.fetch(
            "SELECT log_index FROM audit.events ORDER BY log_index")]
        dead = {r[0]: r[1] for r in await conn.fetch(
            "SELECT stream_entry_id, rule FROM audit.dead_letters")}
        report = await verify_log(
            conn, LocalSigner(key_dir / "signing.pem").public_key_pem(), log_id="audit-log"
        )
    finally:
        await conn.close()
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(stored) == set(good), (
        f"lost {len(set(good) - set(stored))}, unexpected {len(set(stored) - set(good))}"
    )
    assert producer.good_ids <= set(good), "an acknowledged XADD is missing from the stream"
    assert set(dead) == bad, "dead letters are not exactly the malformed entries"
    assert "delivery_limit_exceeded" not in dead.values()
    assert indices == list(range(len(indices))), "log indices have gaps"
    assert report.ok, report.findings[:5]
    return Account(
        entries=len(rows), good_entries=len(good), bad_entries=len(bad), stored=len(stored),
        replays=len(good) - len(set(good)), dead_lettered=len(dead), verified=report.ok,
    )


def write_benchmarks_section(path: Path, section: str) -> None:
    """Replace (or add) the ``## Chaos recovery`` section, leaving the rest untouched."""
    heading = "## Chaos recovery"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1:] if end != -1 else ""
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    path.write_text(text)
