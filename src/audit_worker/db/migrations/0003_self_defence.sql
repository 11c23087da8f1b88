-- kind: expand
-- The database defends itself against whoever holds it, where a database can (issue 12):
-- TRUNCATE refused on audit.events and on each of its partitions, the migrations' record
-- closed to the worker's role, audit.ensure_partitions bounded. What a superuser or the
-- owner can still do (disable a trigger; detach or drop a partition) cannot be refused by
-- the schema itself: pgaudit records it (docs/guides/migration-guide.md, 0003).

-- Each trigger below takes a brief SHARE ROW EXCLUSIVE lock, which waits for appends in
-- flight and holds new ones behind it: fail rather than queue every writer.
SET LOCAL lock_timeout = '5s';

-- 1. Every partition of audit.events refuses TRUNCATE, and UPDATE or DELETE on its own.
-- PostgreSQL clones row triggers of a partitioned table to its partitions, but not
-- statement triggers, and TRUNCATE of one partition fires only that partition's triggers:
-- each partition needs its own. DETACH PARTITION drops the cloned row trigger, which would
-- leave a detached month open to DELETE: each partition gets a row guard of its own too.
-- TRUNCATE guards are ENABLE ALWAYS, so that they fire under session_replication_role =
-- replica as well: emptying a table takes ALTER TABLE ... DISABLE TRIGGER (DDL).
CREATE FUNCTION audit.guard_events_partition(part regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = part
                   AND tgname = 'events_no_truncate') THEN
        EXECUTE format('CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON %s'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change()', part);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER events_no_truncate', part);
    END IF;
    IF part <> 'audit.events'::regclass AND NOT EXISTS (
            SELECT FROM pg_trigger WHERE tgrelid = part
            AND tgname = 'events_partition_append_only') THEN
        EXECUTE format('CREATE TRIGGER events_partition_append_only BEFORE UPDATE OR DELETE'
                       ' ON %s FOR EACH ROW EXECUTE FUNCTION audit.refuse_change()', part);
    END IF;
END $$;
REVOKE ALL ON FUNCTION audit.guard_events_partition(regclass) FROM PUBLIC;

SELECT audit.guard_events_partition('audit.events'::regclass);
SELECT audit.guard_events_partition(inhrelid::regclass)
FROM pg_inherits WHERE inhparent = 'audit.events'::regclass;

-- 2. Same name, signature, default and owner (SECURITY DEFINER: the writer role has no
-- DDL rights), now bounded: the writer role may call it, and a huge months_ahead would
-- create thousands of tables. Partitions it creates are guarded like those above.
-- Bounds are computed exactly as in 0001 (months in the session's time zone) so that a
-- new month starts where the one before ends.
CREATE OR REPLACE FUNCTION audit.ensure_partitions(months_ahead integer DEFAULT 2)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    first_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    m date;
    created integer := 0;
    part text;
BEGIN
    IF months_ahead IS NULL OR months_ahead NOT BETWEEN 0 AND 12 THEN
        RAISE EXCEPTION 'audit.ensure_partitions: months_ahead must be between 0 and 12, got %',
                coalesce(months_ahead::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Partitions are kept at most a year ahead; the worker calls '
                         'audit.ensure_partitions(2) at start-up and at every maintenance.';
    END IF;
    -- Two workers starting together would both find a month missing and both create it.
    PERFORM pg_advisory_xact_lock(7022629598042026612);  -- 'auditprt'
    FOR i IN 0..months_ahead LOOP
        m := (first_month + make_interval(months => i))::date;
        part := format('events_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(format('audit.%I', part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE audit.%I PARTITION OF audit.events FOR VALUES FROM (%L) TO (%L)',
                part, m::timestamptz, (m + interval '1 month')::timestamptz);
            created := created + 1;
        END IF;
        PERFORM audit.guard_events_partition(format('audit.%I', part)::regclass);
    END LOOP;
    RETURN created;
END $$;
REVOKE ALL ON FUNCTION audit.ensure_partitions(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.ensure_partitions(integer) TO audit_writer;

-- 3. The TRUNCATE guards of 0002 fire under session_replication_role = replica too; the
-- tables 0001 left unguarded get guards: the wrapped data keys (without them sealed fields
-- cannot be read), the migrations' record (evidence of what the schema was), and the
-- intake spool (events accepted but not yet in the log; its rows leave by DELETE only).
ALTER TABLE audit.log_identity ENABLE ALWAYS TRIGGER log_identity_no_truncate;
ALTER TABLE audit.event_keys ENABLE ALWAYS TRIGGER event_keys_no_truncate;
ALTER TABLE audit.dead_letter_replays ENABLE ALWAYS TRIGGER dead_letter_replays_no_truncate;
ALTER TABLE audit.tree_heads ENABLE ALWAYS TRIGGER tree_heads_no_truncate;
ALTER TABLE audit.dead_letters ENABLE ALWAYS TRIGGER dead_letters_no_truncate;

CREATE TRIGGER data_keys_append_only BEFORE UPDATE OR DELETE ON audit.data_keys
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER schema_migrations_append_only BEFORE UPDATE OR DELETE
    ON audit.schema_migrations FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER data_keys_no_truncate BEFORE TRUNCATE ON audit.data_keys
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER schema_migrations_no_truncate BEFORE TRUNCATE ON audit.schema_migrations
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER intake_spool_no_truncate BEFORE TRUNCATE ON audit.intake_spool
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
ALTER TABLE audit.data_keys ENABLE ALWAYS TRIGGER data_keys_no_truncate;
ALTER TABLE audit.schema_migrations ENABLE ALWAYS TRIGGER schema_migrations_no_truncate;
ALTER TABLE audit.intake_spool ENABLE ALWAYS TRIGGER intake_spool_no_truncate;

-- 4. The migrations' record: 0001's grant on all tables gave the writer role INSERT on it
-- (the bookkeeping table exists before 0001 runs). A worker only reads it, to refuse a
-- schema that is behind or was altered (require_current).
REVOKE ALL ON audit.schema_migrations FROM PUBLIC;
REVOKE ALL ON audit.schema_migrations FROM audit_writer;
GRANT SELECT ON audit.schema_migrations TO audit_writer;
