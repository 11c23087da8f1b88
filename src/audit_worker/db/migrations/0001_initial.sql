-- kind: expand
-- The append-only audit log: events (partitioned by the time they were recorded), signed
-- tree heads, dead letters and wrapped data keys. Nothing here is ever updated or deleted.

CREATE SCHEMA IF NOT EXISTS audit;

CREATE TABLE audit.events (
    log_index     bigint      NOT NULL,
    event_id      uuid        NOT NULL,
    recorded      timestamptz NOT NULL,
    occurred      timestamptz NOT NULL,
    action        char(1)     NOT NULL,
    outcome       smallint    NOT NULL,
    patient_hmac  bytea,
    actor_hmac    bytea       NOT NULL,
    data_key_id   text,
    leaf_data     bytea       NOT NULL,
    leaf_hash     bytea       NOT NULL CHECK (length(leaf_hash) = 32),
    PRIMARY KEY (log_index, recorded)
) PARTITION BY RANGE (recorded);

-- Rows outside every monthly partition land here rather than failing the batch.
CREATE TABLE audit.events_default PARTITION OF audit.events DEFAULT;

CREATE INDEX events_event_id_idx ON audit.events (event_id);
-- recorded grows with log_index, so a BRIN index serves time ranges at a fraction of a
-- B-tree's write cost.
CREATE INDEX events_recorded_idx ON audit.events USING brin (recorded);
CREATE INDEX events_patient_idx ON audit.events (patient_hmac, occurred)
    WHERE patient_hmac IS NOT NULL;
CREATE INDEX events_actor_idx ON audit.events (actor_hmac, occurred);

CREATE TABLE audit.tree_heads (
    tree_size     bigint      PRIMARY KEY CHECK (tree_size >= 0),
    root_hash     bytea       NOT NULL CHECK (length(root_hash) = 32),
    timestamp_ms  bigint      NOT NULL,
    log_id        text        NOT NULL,
    signature     bytea       NOT NULL,
    signer_ref    text        NOT NULL,
    -- The compact range at this size lets a restarted worker resume without re-reading the
    -- log. Verification never trusts it: it recomputes everything from the leaves.
    frontier      bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit.dead_letters (
    id               bigserial   PRIMARY KEY,
    stream_entry_id  text        UNIQUE,
    received_at      timestamptz NOT NULL DEFAULT now(),
    field            text        NOT NULL,
    value_class      text        NOT NULL,
    rule             text        NOT NULL,
    message          text        NOT NULL,
    delivery_count   integer     NOT NULL DEFAULT 1,
    -- The raw payload may hold PHI, so it is kept only encrypted.
    payload_sealed   bytea,
    data_key_id      text
);
CREATE INDEX dead_letters_rule_idx ON audit.dead_letters (rule, received_at);

CREATE TABLE audit.data_keys (
    key_id       text        PRIMARY KEY,
    purpose      text        NOT NULL,
    wrapped      bytea       NOT NULL,
    wrapper_ref  text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Monthly partitions for the current month and the months ahead. SECURITY DEFINER so the
-- writer role, which has no DDL rights, can keep partitions ahead of time.
CREATE FUNCTION audit.ensure_partitions(months_ahead integer DEFAULT 2)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp AS $$
DECLARE
    first_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    m date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0..months_ahead LOOP
        m := (first_month + make_interval(months => i))::date;
        part := format('events_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(format('audit.%I', part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE audit.%I PARTITION OF audit.events FOR VALUES FROM (%L) TO (%L)',
                part, m::timestamptz, (m + interval '1 month')::timestamptz);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

SELECT audit.ensure_partitions(2);

-- Defence in depth beside the missing grants: even the owner cannot rewrite history
-- without first disabling this trigger, which pgaudit records.
CREATE FUNCTION audit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit.% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON audit.events
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER tree_heads_append_only BEFORE UPDATE OR DELETE ON audit.tree_heads
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER dead_letters_append_only BEFORE UPDATE OR DELETE ON audit.dead_letters
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();

-- The writer role: read and append, nothing else. Logins are granted this role by ops.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'audit_writer') THEN
        CREATE ROLE audit_writer NOLOGIN;
    END IF;
END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO audit_writer;
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA audit TO audit_writer;
REVOKE UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA audit FROM audit_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA audit TO audit_writer;
GRANT EXECUTE ON FUNCTION audit.ensure_partitions(integer) TO audit_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA audit GRANT SELECT, INSERT ON TABLES TO audit_writer;
