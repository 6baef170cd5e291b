-- The audit tables: client messages by day, dead letters, and the dispatcher's ledger.
CREATE TABLE pgws_audit.messages (
    id             text        NOT NULL,
    channel        text        NOT NULL,
    event          text        NOT NULL,
    payload        text        NOT NULL,
    claims         jsonb       NOT NULL,
    received_at    timestamptz NOT NULL,
    notify_channel text        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);

CREATE INDEX messages_channel_received_at ON pgws_audit.messages (channel, received_at);

CREATE TABLE pgws_audit.dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    stream_seq  bigint      NOT NULL,
    msg_id      text,
    reason      text        NOT NULL,
    data        text        NOT NULL,
    headers     jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, stream_seq)
);

CREATE TABLE pgws_audit.dispatched (
    id            text        PRIMARY KEY,
    dispatched_at timestamptz NOT NULL DEFAULT now()
);

-- The partition holding day `day_number` (days since 1970-01-01, UTC), created if missing.
CREATE FUNCTION pgws_audit.ensure_partition(day_number integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d date := date '1970-01-01' + day_number;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgws_audit.partitions'));
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS pgws_audit.%I PARTITION OF pgws_audit.messages FOR VALUES FROM (%L) TO (%L)',
        'messages_' || to_char(d, 'YYYYMMDD'),
        d::timestamp AT TIME ZONE 'UTC',
        (d + 1)::timestamp AT TIME ZONE 'UTC');
END $$;

-- Drops the daily partitions wholly before `cutoff` (UTC); returns how many.
CREATE FUNCTION pgws_audit.drop_partitions_before(cutoff date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    part text;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgws_audit.partitions'));
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'pgws_audit.messages'::regclass
          AND c.relname < 'messages_' || to_char(cutoff, 'YYYYMMDD')
    LOOP
        EXECUTE format('ALTER TABLE pgws_audit.messages DETACH PARTITION pgws_audit.%I', part);
        EXECUTE format('DROP TABLE pgws_audit.%I', part);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;
