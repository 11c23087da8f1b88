"""Hostile entries for the property tests: marker strings in every position of an event.

Every hostile value holds a marker (``MKR`` and a number) next to ``#`` or a space, so a
marker can never be a valid code: a marker is stored only where the event model seals or
pseudonymises it. After a run, the marker must appear in no log line, no metric, no
plaintext column, no dead-letter announcement and no HTTP answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
from hypothesis import strategies as st

from audit_worker.config import WorkerSettings
from audit_worker.service import Service
from tests.support import make_event

T = TypeVar("T")
MARKER = b"MKR"

# Positions in an event, as paths. Identifiers and free text take any marker (they are
# sealed or pseudonymised); code fields and the fixed-vocabulary fields become invalid.
POSITIONS: list[tuple[str, ...]] = [
    ("event_id",), ("action",), ("code",), ("outcome",), ("occurred",), ("patient",),
    ("detail",), ("agent", "who"), ("agent", "role"), ("agent", "network"),
    ("agent", "requestor"), ("source", "observer"), ("source", "site"), ("source", "type"),
    ("entity", 0, "type"), ("entity", 0, "id"), ("purpose_of_use", 0),
]


def marker(n: int) -> str:
    return f"{MARKER.decode()}{n:06d}"


def _put(event: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = event
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


@st.composite
def hostile_entry(draw: st.DrawFn, n: int) -> bytes:
    """One stream value: a valid event with a marker somewhere, or broken bytes."""
    mark = marker(n)
    event = make_event(n)
    kind = draw(st.sampled_from([
        "value", "value", "unknown_key", "nested_key", "oversized", "invalid_utf8",
        "not_json", "deep", "deep_list", "out_of_range_time", "refused_by_database",
        "valid", "numeric_time",
    ]))
    if kind == "value":
        path = draw(st.sampled_from(POSITIONS))
        filler = draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
        _put(event, path, f"{filler}#{mark} {filler}")
    elif kind == "unknown_key":
        event[f"{mark} Jane Doe"] = draw(st.text(max_size=10))
    elif kind == "nested_key":
        section = draw(st.sampled_from(["agent", "source"]))
        event[section][f"{mark} MRN 12345"] = 1
    elif kind == "oversized":
        event["detail"] = f"{mark} " * 3000
    elif kind == "invalid_utf8":
        raw = json.dumps(event).encode()
        return raw[:40] + b"\xff\xfe" + mark.encode() + b"\xc3" + raw[40:]
    elif kind == "not_json":
        return b'{"event_id": "' + mark.encode() + draw(st.binary(max_size=30))
    elif kind == "deep":
        nested: Any = mark
        for _ in range(draw(st.integers(1, 60))):
            nested = {f"{mark}#k": nested}
        event["entity"] = [nested]
    elif kind == "deep_list":
        # orjson reads 1,024 levels but writes only 254: both sides of that bound.
        depth = draw(st.integers(200, 1100))
        raw = json.dumps({**event, "detail": None}).encode()
        nested = b"[" * depth + b'"#' + mark.encode() + b'"' + b"]" * depth
        return raw[:-1] + b', "entity": ' + nested + b"}"
    elif kind == "numeric_time":
        event["occurred"] = draw(st.sampled_from([0, 1767225600, "1767225600", 253402300800]))
        event["detail"] = f"#{mark}"
    elif kind == "out_of_range_time":
        event["occurred"] = draw(st.sampled_from([
            "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "1969-07-20T20:17:40Z",
        ]))
        event["detail"] = f"#{mark}"
    elif kind == "refused_by_database":
        # Passes validation; the test trigger refuses outcome 8 with SQLSTATE 22021.
        event["outcome"] = 8
        event["detail"] = f"#{mark}"
    else:
        event["detail"] = f"sealed #{mark}"
        event["agent"]["who"] = f"pseudonymised #{mark}"
    return json.dumps(event).encode()


REFUSE_OUTCOME_8 = (
    "CREATE FUNCTION audit.t_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " IF NEW.outcome = 8 THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22021';"
    " END IF; RETURN NEW; END $$",
    "CREATE TRIGGER t_refuse BEFORE INSERT ON audit.events FOR EACH ROW"
    " EXECUTE FUNCTION audit.t_refuse()",
)


class ServiceThread:
    """A whole Service running in a thread of its own, so that synchronous hypothesis
    tests can drive it; `call` runs a coroutine on the service's loop."""

    def __init__(self, settings: WorkerSettings, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.service = Service(settings, create_keys=True, **kwargs)
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._main, name="service", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.service.run(install_signal_handlers=False))
        except BaseException as exc:  # the property says this never happens
            self.error = exc
        finally:
            self.finished.set()

    def start(self) -> ServiceThread:
        self.thread.start()
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.service.stop_event.set)
        self.finished.wait(60)
        self.thread.join(5)
        self.loop.close()

    async def rows(self, sql: str) -> list[asyncpg.Record]:
        parts = self.service.parts
        assert parts is not None, "the worker is not assembled"
        async with parts.pool.acquire() as conn:
            return list(await conn.fetch(sql))


async def every_stored_byte(db: str) -> bytes:
    """Every value of every table in schema audit, bytea as raw bytes, the rest as text."""
    conn = await asyncpg.connect(db)
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'audit' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
        )]
        chunks: list[bytes] = []
        for table in tables:
            for row in await conn.fetch(f'SELECT * FROM audit."{table}"'):
                for value in row.values():
                    chunks.append(
                        bytes(value) if isinstance(value, bytes | memoryview)
                        else str(value).encode()
                    )
    finally:
        await conn.close()
    return b"\n".join(chunks)
