-- kind: expand
-- Exactly-once enforced by the database, not only by a check under the sequencer's lock;
-- the log's identity pinned; the HTTP intake's spool for Redis outages; dead-letter replays.

-- One row: the log this database holds. A worker configured with another log id refuses
-- to start (two log ids on one database would otherwise look like two logs).
CREATE TABLE audit.log_identity (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    log_id     text        NOT NULL,
    pinned_at  timestamptz NOT NULL DEFAULT now()
);
-- A database that already signed heads is pinned to the log id it signed them for.
INSERT INTO audit.log_identity (log_id)
SELECT log_id FROM audit.tree_heads ORDER BY tree_size DESC LIMIT 1;

-- audit.events is partitioned by time, and PostgreSQL cannot enforce a unique key that
-- does not include the partition key. This table, written in the same transaction as the
-- events, makes event_id unique over the whole log and a log index usable once.
-- fingerprint: HMAC of the event's content (keyed like the search columns), so a replay
-- of an event id with a different body is told apart from a plain retry. NULL for rows
-- stored before this migration.
CREATE TABLE audit.event_keys (
    event_id     uuid   PRIMARY KEY,
    log_index    bigint NOT NULL UNIQUE CHECK (log_index >= 0),
    fingerprint  bytea  CHECK (length(fingerprint) = 32)
);
INSERT INTO audit.event_keys (event_id, log_index)
SELECT event_id, log_index FROM audit.events;

CREATE TRIGGER event_keys_append_only BEFORE UPDATE OR DELETE ON audit.event_keys
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER log_identity_append_only BEFORE UPDATE OR DELETE ON audit.log_identity
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();

-- Events accepted by POST /v1/events while Redis was unreachable, sealed like dead-letter
-- payloads (the event id is the associated data). The worker moves them into the log and
-- deletes them in the same transaction, so each reaches the log at most once.
CREATE TABLE audit.intake_spool (
    spool_id        bigserial   PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    event_id        uuid        NOT NULL,
    payload_sealed  bytea       NOT NULL,
    data_key_id     text        NOT NULL
);

-- Who replayed which dead letter, and what became of it (audit.dead_letters itself is
-- append-only). replayed_by is the database login, not a name the operator typed.
CREATE TABLE audit.dead_letter_replays (
    id               bigserial   PRIMARY KEY,
    dead_letter_id   bigint      NOT NULL REFERENCES audit.dead_letters (id),
    replayed_at      timestamptz NOT NULL DEFAULT now(),
    replayed_by      text        NOT NULL DEFAULT current_user,
    outcome          text        NOT NULL CHECK (outcome IN ('resubmitted', 'rejected')),
    rule             text,
    stream_entry_id  text
);
CREATE TRIGGER dead_letter_replays_append_only BEFORE UPDATE OR DELETE
    ON audit.dead_letter_replays FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();

-- Row triggers never see TRUNCATE: refuse it too on the tables that hold evidence or
-- the log's identity (the owner could otherwise empty them without a DELETE). The
-- partitions of audit.events need one each, which their creation must add.
CREATE TRIGGER log_identity_no_truncate BEFORE TRUNCATE ON audit.log_identity
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER event_keys_no_truncate BEFORE TRUNCATE ON audit.event_keys
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER dead_letter_replays_no_truncate BEFORE TRUNCATE ON audit.dead_letter_replays
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER tree_heads_no_truncate BEFORE TRUNCATE ON audit.tree_heads
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER dead_letters_no_truncate BEFORE TRUNCATE ON audit.dead_letters
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();

REVOKE ALL ON audit.log_identity, audit.event_keys, audit.intake_spool,
    audit.dead_letter_replays FROM PUBLIC;
GRANT SELECT, INSERT ON audit.log_identity, audit.event_keys, audit.dead_letter_replays
    TO audit_writer;
REVOKE UPDATE, DELETE, TRUNCATE ON audit.log_identity, audit.event_keys,
    audit.dead_letter_replays FROM audit_writer;
-- The spool is a queue, not evidence: its rows leave when they enter the log.
GRANT SELECT, INSERT, DELETE ON audit.intake_spool TO audit_writer;
REVOKE UPDATE, TRUNCATE ON audit.intake_spool FROM audit_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA audit TO audit_writer;
