"""Leaves: canonical bytes, PHI never in clear, index and time spliced in by the sequencer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from audit_worker.crypto import DataKeyManager, FieldCipher, LocalKeyWrapper, Pseudonymiser
from audit_worker.events import AuditEvent, parse_event
from audit_worker.merkle import hash_leaf
from audit_worker.records import RecordBuilder, iso_ms, parse_leaf, sequence
from tests.support import make_event


def _builder(tmp_path: Path) -> tuple[RecordBuilder, DataKeyManager, FieldCipher, Pseudonymiser]:
    keys = DataKeyManager(LocalKeyWrapper(tmp_path / "k", create=True))
    pseudo = Pseudonymiser(b"h" * 32)
    cipher = FieldCipher()
    return RecordBuilder(pseudo, cipher), keys, cipher, pseudo


def _event(n: int = 1) -> AuditEvent:
    parsed = parse_event(json.dumps(make_event(n)).encode())
    assert isinstance(parsed, AuditEvent)
    return parsed


def test_leaf_is_canonical_json_with_index_and_recorded_first(tmp_path: Path) -> None:
    builder, keys, _, _ = _builder(tmp_path)
    recorded = datetime(2026, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    leaf = sequence(builder.prepare(_event(), keys.current()), 41, recorded)
    assert leaf.leaf_data.startswith(b'{"log_index":41,"recorded":"2026-05-01T12:00:00.123Z",')
    decoded = parse_leaf(leaf.leaf_data)
    rest = [k for k in decoded if k not in ("log_index", "recorded")]
    assert rest == sorted(rest)
    assert leaf.leaf_hash == hash_leaf(leaf.leaf_data)


def test_identifiers_are_hmacs_searchable_by_the_known_value(tmp_path: Path) -> None:
    builder, keys, _, pseudo = _builder(tmp_path)
    prepared = builder.prepare(_event(7), keys.current())
    leaf = parse_leaf(sequence(prepared, 0, datetime.now(UTC)).leaf_data)
    assert leaf["patient_hmac"] == pseudo.hexdigest("patient", "MRN-TEST-000007")
    assert leaf["actor_hmac"] == pseudo.hexdigest("actor", "clinician-7")
    assert prepared.patient_hmac == bytes.fromhex(leaf["patient_hmac"])
    assert b"MRN-TEST" not in prepared.body and b"clinician-7" not in prepared.body


def test_free_text_and_entity_ids_are_sealed_to_the_event(tmp_path: Path) -> None:
    builder, keys, cipher, _ = _builder(tmp_path)
    event = _event(3)
    key = keys.current()
    leaf = parse_leaf(sequence(builder.prepare(event, key), 0, datetime.now(UTC)).leaf_data)
    import base64

    blob = base64.b64decode(leaf["sealed"]["ct"])
    opened = json.loads(cipher.decrypt(key, blob, event.event_id.bytes))
    assert opened == {
        "detail": "synthetic chart access for load testing",
        "entity_ids": ["obs-3"],
    }
    assert leaf["sealed"]["key_id"] == key.key_id


def test_same_event_gives_same_bytes(tmp_path: Path) -> None:
    builder, keys, _, _ = _builder(tmp_path)
    event = _event()
    a = builder.prepare(event, keys.current())
    b = builder.prepare(event, keys.current())
    # the sealed part has a random nonce; everything else is identical
    strip = lambda body: {k: v for k, v in json.loads(body).items() if k != "sealed"}  # noqa: E731
    assert strip(a.body) == strip(b.body)


def test_iso_ms_is_utc_with_milliseconds() -> None:
    assert iso_ms(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
