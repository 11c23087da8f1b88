-- kind: expand
-- Closed months exported to the S3 Object Lock archive as self-verifying bundles (see
-- audit_worker.archive), and the months that then left the hot database. Both tables are
-- append-only evidence; only the SECURITY DEFINER function below may detach a partition,
-- and only one recorded here as exported and verified. Nothing earlier depends on this.

-- One row per exported month, written after the uploaded copy was read back and verified.
-- end_range is the compact range at end_index (its root is end_root, which checkpoint, a
-- signed note, signs): with it the hot rows verify after earlier months were detached.
CREATE TABLE audit.archived_months (
    month         date        PRIMARY KEY CHECK (month = date_trunc('month', month)::date),
    first_index   bigint      NOT NULL CHECK (first_index >= 0),
    end_index     bigint      NOT NULL CHECK (end_index >= first_index),
    rows          bigint      NOT NULL CHECK (rows = end_index - first_index),
    end_root      bytea       NOT NULL CHECK (length(end_root) = 32),
    end_range     bytea       NOT NULL CHECK (length(end_range) % 32 = 0),
    checkpoint    bytea       NOT NULL,
    archive_url   text        NOT NULL,
    manifest_key  text        NOT NULL,
    object_keys   text[]      NOT NULL,
    bytes         bigint      NOT NULL CHECK (bytes >= 0),
    exported_by   text        NOT NULL DEFAULT current_user,
    verified_at   timestamptz NOT NULL
);

-- One row per month whose partition was detached and dropped (by the function below only).
CREATE TABLE audit.detached_months (
    month        date        PRIMARY KEY REFERENCES audit.archived_months (month),
    detached_at  timestamptz NOT NULL DEFAULT now(),
    detached_by  text        NOT NULL DEFAULT session_user
);

CREATE TRIGGER archived_months_append_only BEFORE UPDATE OR DELETE ON audit.archived_months
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER archived_months_no_truncate BEFORE TRUNCATE ON audit.archived_months
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER detached_months_append_only BEFORE UPDATE OR DELETE ON audit.detached_months
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER detached_months_no_truncate BEFORE TRUNCATE ON audit.detached_months
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
-- Also under session_replication_role = replica: emptying them takes DDL (pgaudit sees it).
ALTER TABLE audit.archived_months ENABLE ALWAYS TRIGGER archived_months_no_truncate;
ALTER TABLE audit.detached_months ENABLE ALWAYS TRIGGER detached_months_no_truncate;

-- Detach and drop the partition of one month, only if audit.archived_months records it as
-- exported and verified and the partition still holds exactly the exported index range
-- (a row added after the export would otherwise be lost). SECURITY DEFINER so that the
-- writer role, which has no DDL rights, can keep hot storage bounded; it can do nothing
-- else with it. Returns the rows that left, 0 when the month was already detached.
CREATE FUNCTION audit.detach_archived_month(archived_month date)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp AS $$
DECLARE
    part text := format('events_%s', to_char(archived_month, 'YYYY_MM'));
    rec audit.archived_months%ROWTYPE;
    lo bigint;
    hi bigint;
BEGIN
    IF archived_month IS NULL OR archived_month <> date_trunc('month', archived_month)::date THEN
        RAISE EXCEPTION 'detach_archived_month needs the first day of a month, got %',
            archived_month USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO rec FROM audit.archived_months WHERE month = archived_month;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'month % is not in audit.archived_months (not exported and verified): '
            'audit.% stays; run `audit-worker archive export` first', to_char(archived_month,
            'YYYY-MM'), part USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF to_regclass(format('audit.%I', part)) IS NULL THEN
        IF EXISTS (SELECT 1 FROM audit.detached_months WHERE month = archived_month) THEN
            RETURN 0;
        END IF;
        RAISE EXCEPTION 'audit.% does not exist, and month % was never detached', part,
            to_char(archived_month, 'YYYY-MM') USING ERRCODE = 'undefined_table';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = 'audit.events'::regclass
                   AND inhrelid = format('audit.%I', part)::regclass) THEN
        RAISE EXCEPTION 'audit.% is not a partition of audit.events', part
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Bounded wait: queued behind a long reader, this lock would hold up every writer.
    PERFORM set_config('lock_timeout', '5s', true);
    LOCK TABLE ONLY audit.events IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('LOCK TABLE audit.%I IN ACCESS EXCLUSIVE MODE', part);
    -- The sequencer hands out indices in order, so any row added after the export has a
    -- larger index: min and max (two index probes) show whether the rows are the exported.
    EXECUTE format('SELECT min(log_index), max(log_index) FROM audit.%I', part) INTO lo, hi;
    IF rec.rows = 0 AND lo IS NOT NULL
       OR rec.rows > 0 AND (lo IS DISTINCT FROM rec.first_index
                            OR hi IS DISTINCT FROM rec.end_index - 1) THEN
        RAISE EXCEPTION 'audit.% holds indices %..%, but the export of % covers %..%: it '
            'stays; run `audit-worker verify`', part, lo, hi, to_char(archived_month, 'YYYY-MM'),
            rec.first_index, rec.end_index - 1 USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    EXECUTE format('ALTER TABLE audit.events DETACH PARTITION audit.%I', part);
    EXECUTE format('DROP TABLE audit.%I', part);
    INSERT INTO audit.detached_months (month) VALUES (archived_month);
    RETURN rec.rows;
END $$;

REVOKE ALL ON audit.archived_months, audit.detached_months FROM PUBLIC;
GRANT SELECT, INSERT ON audit.archived_months TO audit_writer;
GRANT SELECT ON audit.detached_months TO audit_writer;
-- Default privileges (0001) would grant INSERT: only the function writes detached_months.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON audit.detached_months FROM audit_writer;
REVOKE UPDATE, DELETE, TRUNCATE ON audit.archived_months FROM audit_writer;
-- Detaching drops a month's rows from the database: a login that may insert into
-- archived_months and call the function could record a fake export and drop a month
-- (verify --archive would then report it missing, but the rows would be gone). So it is
-- not the writer's right: an environment that turns detaching on grants this role to the
-- worker's login on purpose (GRANT audit_archiver TO <login>, deployment guide).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'audit_archiver') THEN
        CREATE ROLE audit_archiver NOLOGIN;
    END IF;
END $$;
REVOKE ALL ON FUNCTION audit.detach_archived_month(date) FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO audit_archiver;
GRANT EXECUTE ON FUNCTION audit.detach_archived_month(date) TO audit_archiver;
