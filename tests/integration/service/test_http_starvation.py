"""The health listener cannot be starved by intake clients (real servers, 127.0.0.1 only).

The kubelet kills a worker whose /livez misses its 5 s timeout three times, and takes it
out of the Service when /readyz misses 3 s. Idle and slow producers on the intake port
must therefore never delay the health port, and must themselves be cut off within the
documented bounds (README, "Running the worker in production").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from audit_worker.config import WorkerSettings
from audit_worker.errors import DependencyError
from audit_worker.http.app import HEALTH_PATHS, INTAKE_PATHS
from audit_worker.service import Service
from tests.integration.service.conftest import TOKEN, eventually, running
from tests.support import make_event

HOST = "127.0.0.1"
PROBES = {"/livez": 5.0, "/readyz": 3.0}  # the chart's probe timeouts
IDLE_CONNECTIONS = 300  # more than intake_max_connections (256)
SLOW_CLIENTS = 8
SLOW_BYTE_EVERY = 0.5  # seconds between body bytes
SLACK = 1.5  # seconds a cut-off may come after its bound (loop scheduling, CI machines)
POLL_EVERY = 0.2
MAX_POLLS = 200  # bounds the poller even if the slow clients never finish


def _slow_head(port: int, length: int) -> bytes:
    return (
        f"POST /v1/events HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _status(reply: bytes) -> int | None:
    if reply.startswith(b"HTTP/1.1 "):
        return int(reply[9:12])
    return None


@dataclass
class SlowResult:
    seconds: float  # from the end of the head to the answer or the close
    status: int | None  # None: closed without an answer
    bytes_sent: int


async def slow_body(port: int, *, length: int = 1000, max_seconds: float = 30.0) -> SlowResult:
    """Send a head, then one body byte every SLOW_BYTE_EVERY s until the server answers
    or closes (bounded by `max_seconds`)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(_slow_head(port, length))
        await writer.drain()
        started = time.perf_counter()
        sent = 0
        while sent < length and time.perf_counter() - started < max_seconds:
            try:
                reply = await asyncio.wait_for(reader.read(4096), SLOW_BYTE_EVERY)
            except TimeoutError:
                try:
                    writer.write(b" ")
                    await writer.drain()
                except (ConnectionError, OSError):
                    return SlowResult(time.perf_counter() - started, None, sent)
                sent += 1
                continue
            return SlowResult(time.perf_counter() - started, _status(reply), sent)
        raise AssertionError(f"slow client not cut off within {max_seconds}s ({sent} bytes)")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def closed_after(reader: asyncio.StreamReader, since: float, max_seconds: float) -> float:
    """Seconds from `since` (a perf_counter time) until the server closes the connection
    (EOF); fails after `max_seconds`."""
    started = since
    while time.perf_counter() - started < max_seconds:
        try:
            data = await asyncio.wait_for(reader.read(4096), 0.1)
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            return time.perf_counter() - started
        if not data:
            return time.perf_counter() - started
    raise AssertionError(f"connection still open after {max_seconds}s")


@dataclass
class Probes:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PROBES})
    statuses: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PROBES})

    async def poll(self, port: int, stop: asyncio.Event) -> None:
        # A new connection per probe, as the kubelet does (no keep-alive).
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", headers={"Connection": "close"}
        ) as client:
            for _ in range(MAX_POLLS):
                if stop.is_set():
                    return
                for path, timeout in PROBES.items():
                    started = time.perf_counter()
                    reply = await client.get(path, timeout=timeout)
                    self.latencies[path].append(time.perf_counter() - started)
                    self.statuses[path].append(reply.status_code)
                await asyncio.sleep(POLL_EVERY)

    def figures(self) -> dict[str, dict[str, float]]:
        out = {}
        for path, values in self.latencies.items():
            ordered = sorted(values)
            out[path] = {
                "n": len(ordered),
                "p50_ms": round(statistics.median(ordered) * 1000, 1),
                "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1),
                "p100_ms": round(ordered[-1] * 1000, 1),
            }
        return out


async def open_idle(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`n` connections that send nothing, opened in small groups (bounded by the backlog)."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, n, 50):
        group = [asyncio.open_connection(HOST, port) for _ in range(min(50, n - start))]
        conns += await asyncio.wait_for(asyncio.gather(*group), 10)
    return conns


async def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


async def post_event(port: int, n: int) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as client:
        return await client.post(
            "/v1/events", json=make_event(n), headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )


def _ports(service: Service) -> tuple[int, int]:
    assert service.http_port and service.intake_port
    assert service.http_port != service.intake_port
    return service.http_port, service.intake_port


def _http(settings: WorkerSettings, **extra: Any) -> WorkerSettings:
    return settings.model_copy(update={"http_port": 0, "intake_port": 0, **extra})


async def _ready(port: int) -> bool:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://{HOST}:{port}/readyz", timeout=3)).status_code == 200


async def test_probes_stay_fast_while_idle_and_slow_clients_hold_the_intake(
    settings: WorkerSettings,
) -> None:
    # Idle connections are held for the whole test (a long head timeout): the worst case.
    settings = _http(settings, intake_header_timeout_seconds=30.0)
    body_timeout = settings.intake_body_timeout_seconds
    assert body_timeout == 10.0  # the documented default bound
    async with running(settings, serve_http=True) as worker:
        health, intake = _ports(worker.service)
        await eventually(lambda: _ready(health), 15, 0.1, "readiness before the flood")

        slow = [asyncio.create_task(slow_body(intake)) for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.3)  # the slow heads are in before the idle flood
        idle = await open_idle(intake, IDLE_CONNECTIONS)
        stop = asyncio.Event()
        probes = Probes()
        poller = asyncio.create_task(probes.poll(health, stop))
        try:
            # Over its connection limit the intake refuses at once, without queueing.
            started = time.perf_counter()
            refused = await post_event(intake, 1)
            refused_ms = (time.perf_counter() - started) * 1000
            assert refused.status_code == 503, refused.text
            results = await asyncio.wait_for(asyncio.gather(*slow), body_timeout + 20)
            await asyncio.sleep(1.0)  # a few more probes with only the idle flood left
        finally:
            stop.set()
            await asyncio.wait_for(poller, 30)
            await close_all(idle)
            for task in slow:
                task.cancel()
        # With the flood gone, the intake takes events again.
        await eventually(
            lambda: _accepted(intake), 10, 0.2, "intake accepting after the flood"
        )

    figures = probes.figures()
    cutoffs = sorted(round(r.seconds, 2) for r in results)
    print("\nprobe latency on the health port while the intake held "
          f"{IDLE_CONNECTIONS} idle + {SLOW_CLIENTS} slow connections:",
          json.dumps(figures))
    print(f"slow clients cut off after (s): {cutoffs}; statuses "
          f"{sorted({r.status for r in results}, key=str)}; intake at its limit answered "
          f"503 in {refused_ms:.1f} ms")
    for path, timeout in PROBES.items():
        assert probes.statuses[path] and set(probes.statuses[path]) == {200}, (
            path, probes.statuses[path])
        assert max(probes.latencies[path]) < 1.0, (path, figures[path])
        assert max(probes.latencies[path]) < timeout
    assert figures["/livez"]["n"] >= 20  # polled throughout, not once
    for result in results:
        assert result.status in (408, None), result
        assert body_timeout - 0.5 <= result.seconds <= body_timeout + SLACK, result
        assert result.bytes_sent < 1000


async def _accepted(port: int) -> bool:
    return (await post_event(port, 2)).status_code == 202


async def test_idle_connections_and_slow_heads_are_cut_off(settings: WorkerSettings) -> None:
    header_timeout, keep_alive = 2.0, 1
    settings = _http(
        settings, intake_header_timeout_seconds=header_timeout,
        intake_keep_alive_seconds=keep_alive,
    )
    async with running(settings, serve_http=True) as worker:
        health, intake = _ports(worker.service)
        idle = await open_idle(intake, 20)
        idle_since = time.perf_counter()
        slowloris_reader, slowloris = await asyncio.open_connection(HOST, intake)
        slowloris_since = time.perf_counter()
        head = _slow_head(intake, 10)

        async def dribble() -> None:
            for byte in head[:40]:  # one byte of the head every 0.5 s: never complete
                slowloris.write(bytes([byte]))
                await slowloris.drain()
                await asyncio.sleep(SLOW_BYTE_EVERY)

        dribbler = asyncio.create_task(dribble())
        try:
            bound = header_timeout + SLACK + 1
            idle_closed, head_closed = await asyncio.gather(
                asyncio.gather(*(closed_after(r, idle_since, bound) for r, _ in idle)),
                closed_after(slowloris_reader, slowloris_since, bound),
            )
        finally:
            dribbler.cancel()
            await asyncio.gather(dribbler, return_exceptions=True)
            await close_all([*idle, (slowloris_reader, slowloris)])

        # A kept-alive connection goes after keep_alive seconds of idleness.
        reader, writer = await asyncio.open_connection(HOST, intake)
        try:
            body = json.dumps(make_event(3)).encode()
            writer.write(_slow_head(intake, len(body)) + body)
            await writer.drain()
            reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answered = time.perf_counter()
            assert _status(reply) == 202, reply
            kept_alive = await closed_after(reader, answered, keep_alive + SLACK + 1)
        finally:
            await close_all([(reader, writer)])

        # A head still incomplete after 16 KiB is refused at once, not buffered further.
        reader, writer = await asyncio.open_connection(HOST, intake)
        try:
            writer.write(_slow_head(intake, 2).replace(b"\r\n\r\n", b"\r\nX-Pad: ", 1)
                         + b"a" * 20_000)
            await writer.drain()
            huge = await asyncio.wait_for(reader.read(4096), 5)
        finally:
            await close_all([(reader, writer)])
        assert _status(huge) == 400, huge
        assert await _ready(health)

    print(f"\nintake cut-offs: {len(idle)} idle connections after "
          f"{min(idle_closed):.2f}-{max(idle_closed):.2f}s, a head sent a byte every "
          f"{SLOW_BYTE_EVERY}s after {head_closed:.2f}s (bound {header_timeout:g}s), "
          f"an idle kept-alive connection after {kept_alive:.2f}s (bound {keep_alive}s)")
    for seconds in (*idle_closed, head_closed):
        assert header_timeout - 0.3 <= seconds <= header_timeout + SLACK
    assert keep_alive - 0.3 <= kept_alive <= keep_alive + SLACK


async def test_each_port_serves_only_its_own_paths(settings: WorkerSettings) -> None:
    async with running(settings.model_copy(update={"http_port": 0}), serve_http=True) as worker:
        health, intake = _ports(worker.service)
        await eventually(lambda: _ready(health), 15, 0.1, "readiness")
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{health}") as on_health, \
                httpx.AsyncClient(base_url=f"http://{HOST}:{intake}") as on_intake:
            for path in sorted(HEALTH_PATHS):
                assert (await on_health.get(path, timeout=15)).status_code in (200, 503), path
                refused = await on_intake.get(path, timeout=5)
                assert refused.status_code == 404, path
                assert refused.json()["error"] == "not_found"
                assert "/livez" not in refused.text  # it names only what this port serves
            auth = {"Authorization": f"Bearer {TOKEN}"}
            refused = await on_health.post("/v1/events", json=make_event(1), headers=auth)
            assert refused.status_code == 404 and "/v1/events" not in refused.text
            assert (await on_health.get("/nowhere")).status_code == 404
            accepted = await on_intake.post("/v1/events", json=make_event(1), headers=auth)
            assert accepted.status_code == 202, accepted.text
            assert (await on_intake.get("/v1/events")).status_code == 405
            assert (await on_health.get("/livez")).status_code == 200
            metrics = (await on_health.get("/metrics")).text
            assert 'audit_intake_requests_total{code="202"} 1.0' in metrics


async def test_every_route_is_served_by_exactly_one_listener(settings: WorkerSettings) -> None:
    """A route added to the app but to neither allow-list would be served nowhere."""
    service = Service(settings)
    # From the OpenAPI document: routers included in the app are not flat in app.routes.
    routes = {*service.app.openapi()["paths"], service.app.openapi_url}
    await service.redis.aclose()
    assert not HEALTH_PATHS & INTAKE_PATHS
    assert routes == HEALTH_PATHS | INTAKE_PATHS


@pytest.mark.parametrize("port", ["http_port", "intake_port"])
async def test_a_taken_port_is_named(settings: WorkerSettings, port: str) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        update = {"http_port": 0, "intake_port": 0, "http_host": HOST, port: busy}
        service = Service(settings.model_copy(update=update), serve_http=True)
        try:
            with pytest.raises(DependencyError, match=f"AUDIT_{port.upper()}") as raised:
                await asyncio.wait_for(service.run(install_signal_handlers=False), 30)
        finally:
            await service.redis.aclose()
        assert f"{HOST}:{busy}" in str(raised.value)


async def test_a_full_pool_fails_fast_instead_of_hanging(settings: WorkerSettings) -> None:
    """Every pool acquire has a timeout: with every connection taken, the store gives up
    after AUDIT_DATABASE_ACQUIRE_TIMEOUT_SECONDS and readiness within its probe timeout."""
    acquire_timeout = 1.0
    settings = _http(settings, database_pool_size=2,
                     database_acquire_timeout_seconds=acquire_timeout)
    async with running(settings, serve_http=True) as worker:
        health, _ = _ports(worker.service)
        await eventually(lambda: _ready(health), 15, 0.1, "readiness")
        parts = worker.service.parts
        assert parts is not None
        held = [await parts.pool.acquire(timeout=10) for _ in range(2)]
        try:
            started = time.perf_counter()
            with pytest.raises(TimeoutError):
                await parts.worker.store.tree_heads()
            store_gave_up = time.perf_counter() - started
            async with httpx.AsyncClient(base_url=f"http://{HOST}:{health}") as client:
                started = time.perf_counter()
                ready = await client.get("/readyz", timeout=PROBES["/readyz"])
                ready_s = time.perf_counter() - started
                live = await client.get("/livez", timeout=PROBES["/livez"])
        finally:
            for conn in held:
                await parts.pool.release(conn)
        await eventually(lambda: _ready(health), 15, 0.1, "readiness after the pool freed")
    print(f"\nfull pool: the store gave up after {store_gave_up:.2f}s "
          f"(timeout {acquire_timeout:g}s), /readyz answered {ready.status_code} in "
          f"{ready_s * 1000:.0f} ms")
    assert acquire_timeout - 0.1 <= store_gave_up <= acquire_timeout + SLACK
    assert ready.status_code == 503 and ready_s < PROBES["/readyz"]
    assert any("database ping" in p for p in ready.json()["problems"]), ready.json()
    assert live.status_code == 200  # waiting for a connection is not being wedged
