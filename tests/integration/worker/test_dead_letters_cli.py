"""`audit-worker dead-letters list|show|replay` against real PostgreSQL and Redis.

Dead letters are made the way production makes them: bad entries XADDed to the stream and
processed by a real worker. The worker that makes them allows no clock skew at all
(`max_future_skew_seconds=0`), so an event dated a minute ahead is dead-lettered for
`not_in_future`; the CLI and the second worker use the default skew, under which the same
event is valid: that is the event replay must store, once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml
from typer.testing import CliRunner, Result

from audit_worker.cli import app
from audit_worker.events import Rejection, parse_event
from tests.support import drain, encode, make_event, migrate_url, running_parts, worker_settings

runner = CliRunner()
PHI = "MRN-TEST"  # every synthetic payload holds a patient id starting with this


@dataclass
class Site:
    database_url: str
    redis_url: str
    key_dir: Path
    config: Path  # settings for the CLI: default clock skew, the worker's key directory
    stream: str
    ids: dict[str, int]  # label ("future", "bad_action", "no_event", "bad_json") -> id
    rules: dict[str, str]  # label -> the rule it was dead-lettered for
    future_payload: bytes  # the not_in_future event, valid under the default skew

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def drain_with_default_skew(self) -> tuple[int, int]:
        """Run a worker with the default settings over the stream: (stored, duplicates)."""
        settings = worker_settings(self.database_url, self.redis_url, self.key_dir)
        async with running_parts(settings) as parts:
            stored = await drain(parts)
            return stored, parts.worker.stats.duplicates


async def cli(*args: str) -> Result:
    def invoke() -> Result:
        return runner.invoke(app, list(args), env={"COLUMNS": "200"})

    # The commands call asyncio.run, which cannot run inside the test's own event loop.
    return await asyncio.to_thread(invoke)


def flat(text: str) -> str:
    """Rich wraps long error lines; compare with whitespace collapsed."""
    return " ".join(text.split())


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
async def site(fresh_database: str, fresh_redis: str, tmp_path: Path) -> AsyncIterator[Site]:
    await migrate_url(fresh_database)
    key_dir = tmp_path / "keys"
    strict = worker_settings(fresh_database, fresh_redis, key_dir, max_future_skew_seconds=0)
    ahead = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()  # default skew: 300 s
    sent: dict[str, dict[str, bytes]] = {  # label -> stream entry fields, in XADD order
        "future": {"event": encode(make_event(1, occurred=ahead))},
        "bad_action": {"event": encode(make_event(2, action="X"))},
        "no_event": {"other": b"no event field"},
        "bad_json": {"event": b'{"event_id": "not json'},
    }
    async with running_parts(strict) as parts:
        producer = aioredis.Redis.from_url(fresh_redis)
        try:
            for fields in sent.values():
                await producer.xadd(strict.stream, fields)  # type: ignore[arg-type]
        finally:
            await producer.aclose()
        assert await drain(parts) == 0
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump({
        "database_url": fresh_database, "redis_url": fresh_redis,
        "local_key_dir": str(key_dir),
    }))
    made = Site(fresh_database, fresh_redis, key_dir, config, strict.stream, {}, {},
                sent["future"]["event"])
    rows = await made.fetch("SELECT id, rule FROM audit.dead_letters ORDER BY id")
    assert len(rows) == len(sent)
    made.ids = {label: r["id"] for label, r in zip(sent, rows, strict=True)}
    made.rules = {label: r["rule"] for label, r in zip(sent, rows, strict=True)}
    # The rules are whatever the worker's validation says, as long as they are these.
    assert made.rules["future"] == "not_in_future"
    assert made.rules["no_event"] == "missing_event_field"
    for label in ("bad_action", "bad_json"):
        verdict = parse_event(sent[label]["event"])
        assert isinstance(verdict, Rejection) and verdict.rule == made.rules[label]
    yield made


# --------------------------------------------------------------------------- list


async def test_list_gives_every_reason_newest_first_and_no_payload(site: Site) -> None:
    result = await cli("dead-letters", "list", "--database-url", site.database_url,
                       "--output", "json")
    rows = as_json(result)
    assert [r["id"] for r in rows] == sorted(site.ids.values(), reverse=True)
    assert [r["rule"] for r in rows] == [site.rules[label] for label in reversed(site.rules)]
    future = rows[-1]
    assert future["field"] == "occurred" and future["value_class"] == "datetime"
    assert future["delivery_count"] == 1 and future["has_payload"] is True
    assert future["replayed"] is False and future["last_replay"] is None
    assert future["stream_entry_id"].count("-") == 1
    assert datetime.fromisoformat(future["received_at"]).utcoffset() is not None
    assert rows[1]["has_payload"] is False  # the entry had no event field
    assert PHI not in result.output and "payload_sealed" not in result.output


async def test_list_filters_by_rule_time_window_and_limit(site: Site) -> None:
    base = ("dead-letters", "list", "--database-url", site.database_url, "--output", "json")

    async def rules(*extra: str) -> list[str]:
        return [r["rule"] for r in as_json(await cli(*base, *extra))]

    assert await rules("--rule", "not_in_future", "--rule", site.rules["bad_json"]) == [
        site.rules["bad_json"], "not_in_future",
    ]
    assert await rules("--rule", "no_such_rule") == []
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert len(await rules("--since", hour_ago, "--until", later)) == 4
    assert await rules("--since", later) == []
    assert await rules("--until", hour_ago) == []
    assert await rules("--limit", "1") == [site.rules["bad_json"]]


async def test_list_text_mode_prints_a_table_without_values(site: Site) -> None:
    result = await cli("dead-letters", "list", "--database-url", site.database_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # text mode talks on stderr, like `verify`
    for rule in site.rules.values():
        assert rule in result.stderr
    assert "4 dead letter(s)" in result.stderr and PHI not in result.output


@pytest.mark.parametrize(("option", "value"), [("--since", "2026-13-01"),
                                               ("--until", "yesterday")])
def test_a_bad_time_is_refused_naming_the_option(option: str, value: str) -> None:
    result = runner.invoke(app, ["dead-letters", "list", option, value,
                                 "--database-url", "postgresql://unused.invalid/x"])
    assert result.exit_code == 2
    assert f"error: {option}: '{value}' is not an ISO 8601 date" in flat(result.output)


def test_an_empty_time_window_is_refused() -> None:
    result = runner.invoke(app, ["dead-letters", "list", "--since", "2026-02-01",
                                 "--until", "2026-01-01"])
    assert result.exit_code == 2
    assert "--since must be earlier than --until" in flat(result.output)


# --------------------------------------------------------------------------- show


async def test_show_without_decrypt_gives_the_reason_and_never_the_payload(
    site: Site,
) -> None:
    dl = site.ids["future"]
    shown = as_json(await cli("dead-letters", "show", str(dl), "--database-url",
                              site.database_url, "--output", "json"))
    assert shown["id"] == dl and shown["rule"] == "not_in_future"
    assert "payload" not in shown
    text = await cli("dead-letters", "show", str(dl), "--database-url", site.database_url)
    assert text.exit_code == 0 and text.stdout == ""
    assert "payload: sealed" in text.stderr and PHI not in text.output


@pytest.mark.parametrize(("given", "missing"), [
    ("--decrypt", "--i-understand-this-shows-phi"),
    ("--i-understand-this-shows-phi", "--decrypt"),
])
def test_decrypt_and_the_phi_flag_need_each_other(given: str, missing: str) -> None:
    result = runner.invoke(app, ["dead-letters", "show", "1", given])
    assert result.exit_code == 2
    assert f"add {missing}" in flat(result.output)


async def test_show_decrypt_prints_the_original_payload_with_a_phi_warning(
    site: Site,
) -> None:
    dl = str(site.ids["future"])
    flags = ("--decrypt", "--i-understand-this-shows-phi", "--config", str(site.config))
    text = await cli("dead-letters", "show", dl, *flags)
    assert text.exit_code == 0, text.output
    assert text.stdout == site.future_payload.decode() + "\n"
    assert "may hold PHI" in flat(text.stderr)
    shown = as_json(await cli("dead-letters", "show", dl, *flags, "--output", "json"))
    assert shown["payload"].encode() == site.future_payload
    assert shown["payload_encoding"] == "utf-8" and shown["rule"] == "not_in_future"


async def test_show_of_an_unknown_id_exits_2(site: Site) -> None:
    for extra in ((), ("--decrypt", "--i-understand-this-shows-phi")):
        result = await cli("dead-letters", "show", "999999", "--database-url",
                           site.database_url, "--config", str(site.config), *extra)
        assert result.exit_code == 2
        assert "no dead letter with id 999999" in flat(result.output)


async def _forge(site: Site, source_id: int, entry_id: str, flip: bool) -> int:
    """A dead letter with another's ciphertext: one byte changed, or moved as it is to
    another stream entry id (the associated data). INSERT only: the table refuses UPDATE."""
    conn = await asyncpg.connect(site.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT payload_sealed, data_key_id FROM audit.dead_letters WHERE id = $1",
            source_id,
        )
        assert row is not None
        sealed = bytearray(row["payload_sealed"])
        if flip:
            sealed[20] ^= 0x01
        return int(await conn.fetchval(
            "INSERT INTO audit.dead_letters (stream_entry_id, field, value_class, rule,"
            " message, payload_sealed, data_key_id) VALUES ($1, 'occurred', 'datetime',"
            " 'not_in_future', 'forged', $2, $3) RETURNING id",
            entry_id, bytes(sealed), row["data_key_id"],
        ))
    finally:
        await conn.close()


async def test_show_decrypt_of_a_changed_or_moved_ciphertext_exits_1(site: Site) -> None:
    source = site.ids["future"]
    for forged in (await _forge(site, source, "1-1", flip=True),
                   await _forge(site, source, "1-2", flip=False)):
        result = await cli("dead-letters", "show", str(forged), "--decrypt",
                           "--i-understand-this-shows-phi", "--config", str(site.config))
        assert result.exit_code == 1, result.output
        assert f"dead letter {forged} does not decrypt" in flat(result.output)
        assert result.stdout == "" and PHI not in result.output


async def test_show_decrypt_with_another_master_key_exits_1(
    site: Site, tmp_path: Path
) -> None:
    other = tmp_path / "other-keys"
    other.mkdir()
    (other / "master.key").write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    shutil.copy(site.key_dir / "signing.pem", other / "signing.pem")
    config = tmp_path / "other.yaml"
    config.write_text(site.config.read_text().replace(str(site.key_dir), str(other)))
    result = await cli("dead-letters", "show", str(site.ids["future"]), "--decrypt",
                       "--i-understand-this-shows-phi", "--config", str(config))
    assert result.exit_code == 1
    assert "cannot unwrap data key" in flat(result.output) and result.stdout == ""


async def test_show_decrypt_of_an_entry_without_payload_exits_1(site: Site) -> None:
    result = await cli("dead-letters", "show", str(site.ids["no_event"]),
                       "--decrypt", "--i-understand-this-shows-phi", "--config",
                       str(site.config))
    assert result.exit_code == 1
    assert "has no stored payload (rule missing_event_field)" in flat(result.output)


# --------------------------------------------------------------------------- replay


async def _replays(site: Site) -> list[tuple[int, str, str | None, str | None, bool]]:
    rows = await site.fetch(
        "SELECT dead_letter_id, outcome, rule, stream_entry_id,"
        " replayed_by = current_user AS by_login FROM audit.dead_letter_replays ORDER BY id"
    )
    return [tuple(r.values()) for r in rows]


async def test_dry_run_validates_without_adding_to_the_stream_or_recording(
    site: Site,
) -> None:
    report = as_json(await cli("dead-letters", "replay", "--since", "2020-01-01",
                               "--dry-run", "--config", str(site.config), "--output", "json"))
    assert report["dry_run"] is True and report["selected"] == 4
    assert report["counts"] == {"resubmitted": 0, "rejected": 2, "valid": 1,
                                "not_replayable": 1, "undecryptable": 0}
    by_id = {r["dead_letter_id"]: r for r in report["results"]}
    assert by_id[site.ids["future"]]["outcome"] == "valid"
    assert by_id[site.ids["bad_action"]]["rule"] == site.rules["bad_action"]
    assert await _replays(site) == []
    producer = aioredis.Redis.from_url(site.redis_url)
    try:
        assert await producer.xlen(site.stream) == 4  # only the original entries
    finally:
        await producer.aclose()


async def test_replaying_a_now_valid_event_twice_stores_it_exactly_once(site: Site) -> None:
    dl = site.ids["future"]
    event_id = uuid.UUID(json.loads(site.future_payload)["event_id"])
    replay = ("dead-letters", "replay", str(dl), "--config", str(site.config),
              "--output", "json")
    first = as_json(await cli(*replay))
    assert first["counts"]["resubmitted"] == 1
    assert await site.drain_with_default_skew() == (1, 0)
    second = as_json(await cli(*replay))
    assert second["counts"]["resubmitted"] == 1
    assert await site.drain_with_default_skew() == (0, 1)  # the worker skipped the event id

    stored = await site.fetch("SELECT log_index FROM audit.events WHERE event_id = $1",
                              event_id)
    assert len(stored) == 1
    assert (await site.fetch("SELECT count(*) AS n FROM audit.events"))[0]["n"] == 1
    entries = [first["results"][0]["stream_entry_id"], second["results"][0]["stream_entry_id"]]
    assert await _replays(site) == [(dl, "resubmitted", None, e, True) for e in entries]
    producer = aioredis.Redis.from_url(site.redis_url)
    try:
        for entry in entries:  # resubmitted as a producer sends it: field `event`, same bytes
            found = await producer.xrange(site.stream, min=entry, max=entry)
            assert found is not None
            ((_, fields),) = found
            assert fields == {b"event": site.future_payload}
    finally:
        await producer.aclose()
    listed = as_json(await cli("dead-letters", "list", "--rule", "not_in_future",
                               "--database-url", site.database_url, "--output", "json"))
    assert listed[0]["replayed"] is True and listed[0]["replays"] == 2
    assert listed[0]["last_replay"] == "resubmitted"
    assert PHI not in json.dumps([first, second, listed])


async def test_replay_records_rejections_and_reports_entries_without_payload(
    site: Site,
) -> None:
    result = await cli("dead-letters", "replay", "--rule", site.rules["bad_action"],
                       "--rule", site.rules["bad_json"], "--rule", "missing_event_field",
                       "--config", str(site.config))
    assert result.exit_code == 0, result.output
    assert "3 dead letter(s): resubmitted 0, rejected 2, not replayable 1" in flat(
        result.stderr)
    assert PHI not in result.output
    assert await _replays(site) == [
        (site.ids["bad_action"], "rejected", site.rules["bad_action"], None, True),
        (site.ids["bad_json"], "rejected", site.rules["bad_json"], None, True),
    ]
    assert await site.drain_with_default_skew() == (0, 0)


async def test_replay_of_a_payload_that_does_not_decrypt_exits_1_and_goes_on(
    site: Site,
) -> None:
    forged = await _forge(site, site.ids["future"], "1-1", flip=True)
    result = await cli("dead-letters", "replay", str(forged), str(site.ids["future"]),
                       "--config", str(site.config), "--output", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["counts"]["undecryptable"] == 1 and report["counts"]["resubmitted"] == 1
    assert f"dead letter {forged} does not decrypt" in report["results"][1]["error"]
    assert [r[:2] for r in await _replays(site)] == [
        (site.ids["future"], "resubmitted"),
    ]


async def test_replay_of_an_unknown_id_exits_2_and_replays_nothing(site: Site) -> None:
    result = await cli("dead-letters", "replay", str(site.ids["future"]), "999999",
                       "--config", str(site.config))
    assert result.exit_code == 2
    assert "no dead letter with id 999999" in flat(result.output)
    assert await _replays(site) == []


def test_replay_needs_a_selection() -> None:
    result = runner.invoke(app, ["dead-letters", "replay"])
    assert result.exit_code == 2
    assert "say which dead letters to replay" in flat(result.output)
