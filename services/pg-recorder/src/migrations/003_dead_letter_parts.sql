-- A record may hold several envelopes: a dead letter is keyed by its stream, sequence and the
-- envelope's position in the record (0 for a record of one envelope, or for a whole record).
ALTER TABLE pgws_audit.dead_letters ADD COLUMN part integer NOT NULL DEFAULT 0;
ALTER TABLE pgws_audit.dead_letters DROP CONSTRAINT dead_letters_stream_stream_seq_key;
ALTER TABLE pgws_audit.dead_letters ADD CONSTRAINT dead_letters_stream_seq_part_key
    UNIQUE (stream, stream_seq, part);
