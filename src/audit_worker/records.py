"""From a validated event to the bytes that enter the log.

Identifiers become HMACs, free text and entity ids are encrypted, and the rest is kept in
clear so the log stays useful to auditors. The leaf is canonical JSON: ``log_index`` and
``recorded`` first (the sequencer fills them in), then the other keys sorted, compact
separators, UTF-8. The body is serialised before the sequencer's lock is taken, so inside
the lock only the two leading fields are spliced in.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from audit_worker.crypto import DataKey, FieldCipher, Pseudonymiser
from audit_worker.events import AuditEvent
from audit_worker.merkle import hash_leaf

_SORTED = orjson.OPT_SORT_KEYS


def _dumps(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 (orjson's only layout)."""
    return orjson.dumps(value, option=_SORTED)


def iso_ms(moment: datetime) -> str:
    """UTC with millisecond precision: the one time format inside leaves."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """An event ready for the sequencer: indexed columns plus the serialised body."""

    event_id: uuid.UUID
    occurred: datetime
    action: str
    outcome: int
    patient_hmac: bytes | None
    actor_hmac: bytes
    data_key_id: str | None
    body: bytes  # canonical JSON without log_index and recorded
    # Keyed digest of the event's content (not of its ciphertext, which differs on every
    # sealing): a replayed event id with another body is a conflict, not a retry.
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class SequencedEvent:
    log_index: int
    recorded: datetime
    prepared: PreparedEvent
    leaf_data: bytes
    leaf_hash: bytes


class RecordBuilder:
    """Pseudonymises and encrypts events. One per worker; holds no per-event state."""

    def __init__(self, pseudonymiser: Pseudonymiser, cipher: FieldCipher) -> None:
        self._pseudo = pseudonymiser
        self._cipher = cipher

    def prepare(self, event: AuditEvent, data_key: DataKey) -> PreparedEvent:
        digest = self._pseudo.digest
        patient = digest("patient", event.patient) if event.patient is not None else None
        actor = digest("actor", event.agent.who)
        network = digest("network", event.agent.network) if event.agent.network else None
        sensitive: dict[str, Any] = {}
        if event.detail:
            sensitive["detail"] = event.detail
        entity_ids = [e.id for e in event.entity if e.id is not None]
        if entity_ids:
            sensitive["entity_ids"] = entity_ids
        body: dict[str, Any] = {
            "action": event.action,
            "actor_hmac": actor.hex(),
            "agent_role": event.agent.role,
            "code": event.code,
            "entity_types": [e.type for e in event.entity],
            "event_id": str(event.event_id),
            "network_hmac": network.hex() if network else None,
            # parse_event normalised it to UTC
            "occurred": event.occurred.isoformat(timespec="milliseconds")[:-6] + "Z",
            "outcome": event.outcome,
            "patient_hmac": patient.hex() if patient else None,
            "purpose_of_use": event.purpose_of_use,
            "requestor": event.agent.requestor,
            "sealed": None,
            "source": {
                "observer": event.source.observer,
                "site": event.source.site,
                "type": event.source.type,
            },
        }
        plain = _dumps(body)
        secret = _dumps(sensitive) if sensitive else b""
        fingerprint = self._pseudo.fingerprint(plain + b"\x00" + secret)
        if sensitive:
            # The event id is the associated data: a ciphertext moved to another row fails.
            blob = self._cipher.encrypt(data_key, secret, event.event_id.bytes)
            body["sealed"] = {
                "key_id": data_key.key_id, "ct": base64.b64encode(blob).decode("ascii")
            }
            plain = _dumps(body)
        return PreparedEvent(
            event_id=event.event_id,
            occurred=event.occurred,
            action=event.action,
            outcome=event.outcome,
            patient_hmac=patient,
            actor_hmac=actor,
            data_key_id=data_key.key_id if sensitive else None,
            body=plain,
            fingerprint=fingerprint,
        )


def sequence(
    prepared: PreparedEvent, log_index: int, recorded: datetime, recorded_iso: bytes | None = None
) -> SequencedEvent:
    """Give an event its place in the log. Called under the sequencer's lock: keep it cheap
    (pass `recorded_iso` when sequencing a batch with one timestamp)."""
    stamp = recorded_iso if recorded_iso is not None else iso_ms(recorded).encode()
    leaf_data = b'{"log_index":%d,"recorded":"%s",' % (log_index, stamp) + prepared.body[1:]
    return SequencedEvent(log_index, recorded, prepared, leaf_data, hash_leaf(leaf_data))


def parse_leaf(leaf_data: bytes) -> dict[str, Any]:
    """Decode a stored leaf (for verification and reading)."""
    value = orjson.loads(leaf_data)
    if not isinstance(value, dict):
        raise ValueError("leaf is not a JSON object")
    return value
