-- kind: expand
-- Dead letters hash-chained, so that editing or deleting one is evidence (see
-- src/audit_worker/deadletter_chain.py for the format, docs/audit-log.md for the rules).
-- chain_index is gapless from 0; chain_hash[i] = SHA-256(domain || chain_hash[i-1] ||
-- evidence of row i). The columns are nullable for the release before this one, which
-- does not know them: its inserts are chained by the trigger below, so every row that
-- reaches the table through INSERT is chained whichever release wrote it.

ALTER TABLE audit.dead_letters
    ADD COLUMN chain_index bigint,
    ADD COLUMN chain_hash  bytea;

-- One length-prefixed field of the evidence: 0x00 for NULL, else 0x01, length, bytes.
CREATE FUNCTION audit.dead_letter_chain_field(value bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN value IS NULL THEN '\x00'::bytea
                ELSE '\x01'::bytea || int4send(length(value)) || value END
$$;

-- The same bytes as audit_worker.deadletter_chain.next_hash (received_at in exact
-- microseconds: extract(epoch ...) is numeric from PostgreSQL 14 on).
CREATE FUNCTION audit.dead_letter_chain_hash(
    previous bytea, chain_index bigint, stream_entry_id text, received_at timestamptz,
    field text, value_class text, rule text, message text, delivery_count integer,
    payload_sealed bytea, data_key_id text
) RETURNS bytea
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT sha256(
        convert_to('audit-kit/dead-letter-chain/v1', 'UTF8') || '\x00'::bytea || previous
        || audit.dead_letter_chain_field(int8send(chain_index))
        || audit.dead_letter_chain_field(convert_to(stream_entry_id, 'UTF8'))
        || audit.dead_letter_chain_field(
               int8send((extract(epoch FROM received_at) * 1000000)::bigint))
        || audit.dead_letter_chain_field(convert_to(field, 'UTF8'))
        || audit.dead_letter_chain_field(convert_to(value_class, 'UTF8'))
        || audit.dead_letter_chain_field(convert_to(rule, 'UTF8'))
        || audit.dead_letter_chain_field(convert_to(message, 'UTF8'))
        || audit.dead_letter_chain_field(int8send(delivery_count::bigint))
        || audit.dead_letter_chain_field(sha256(payload_sealed))
        || audit.dead_letter_chain_field(convert_to(data_key_id, 'UTF8')))
$$;

-- Chain the rows written before this migration, in id order. The append-only trigger
-- refuses the UPDATE, so it is disabled for this transaction only (the owner may; pgaudit
-- records it). ADD COLUMN above holds an ACCESS EXCLUSIVE lock until commit: no insert
-- of the running release can land while the trigger is off.
ALTER TABLE audit.dead_letters DISABLE TRIGGER dead_letters_append_only;
DO $$
DECLARE
    r record;
    previous bytea := decode(repeat('00', 32), 'hex');
    n bigint := 0;
BEGIN
    FOR r IN SELECT * FROM audit.dead_letters ORDER BY id LOOP
        previous := audit.dead_letter_chain_hash(
            previous, n, r.stream_entry_id, r.received_at, r.field, r.value_class, r.rule,
            r.message, r.delivery_count, r.payload_sealed, r.data_key_id);
        UPDATE audit.dead_letters SET chain_index = n, chain_hash = previous WHERE id = r.id;
        n := n + 1;
    END LOOP;
END $$;
ALTER TABLE audit.dead_letters ENABLE TRIGGER dead_letters_append_only;

ALTER TABLE audit.dead_letters
    ADD CONSTRAINT dead_letters_chain_index_key UNIQUE (chain_index),
    ADD CONSTRAINT dead_letters_chain_index_check CHECK (chain_index >= 0),
    ADD CONSTRAINT dead_letters_chain_hash_check CHECK (length(chain_hash) = 32),
    ADD CONSTRAINT dead_letters_chained_check CHECK ((chain_index IS NULL) = (chain_hash IS NULL));

-- Rows inserted without a chain (by the release before this one) are chained here, in
-- the order they are inserted. Writers take the sequencer's advisory lock, so the last
-- row read below is the last one committed; an insert that raced outside the lock fails
-- on dead_letters_chain_index_key instead of forking the chain. This release's worker
-- fills both columns itself, so the WHEN clause keeps its inserts off this path.
CREATE FUNCTION audit.dead_letters_chain() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_index bigint;
    last_hash bytea;
BEGIN
    SELECT d.chain_index, d.chain_hash INTO last_index, last_hash
      FROM audit.dead_letters d WHERE d.chain_index IS NOT NULL
     ORDER BY d.chain_index DESC LIMIT 1;
    NEW.chain_index := coalesce(last_index + 1, 0);
    NEW.chain_hash := audit.dead_letter_chain_hash(
        coalesce(last_hash, decode(repeat('00', 32), 'hex')), NEW.chain_index,
        NEW.stream_entry_id, NEW.received_at, NEW.field, NEW.value_class, NEW.rule,
        NEW.message, NEW.delivery_count, NEW.payload_sealed, NEW.data_key_id);
    RETURN NEW;
END $$;

CREATE TRIGGER dead_letters_chain BEFORE INSERT ON audit.dead_letters
    FOR EACH ROW WHEN (NEW.chain_index IS NULL) EXECUTE FUNCTION audit.dead_letters_chain();

GRANT EXECUTE ON FUNCTION audit.dead_letter_chain_field(bytea),
    audit.dead_letter_chain_hash(bytea, bigint, text, timestamptz, text, text, text, text,
                                 integer, bytea, text)
    TO audit_writer;
