-- Client messages that were recorded but never NOTIFYed: their gateway gave up on the NOTIFY
-- (the client got an error frame) and said so on the audit stream. A message without a row
-- here was NOTIFYed, unless its gateway stopped abruptly before it knew.
CREATE TABLE pgws_audit.notify_failures (
    id        text        PRIMARY KEY,
    reason    text        NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX notify_failures_failed_at ON pgws_audit.notify_failures (failed_at);

-- Each recorded message with what happened to it.
CREATE VIEW pgws_audit.message_outcomes AS
SELECT m.*, f.id IS NULL AS notified, f.reason AS notify_error
FROM pgws_audit.messages m
LEFT JOIN pgws_audit.notify_failures f ON f.id = m.id;
