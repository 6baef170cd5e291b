-- The dispatcher ledger is pruned by age (rows older than twice the audit stream's max age,
-- when no record can be redelivered any more): an index keeps that prune from scanning it.
CREATE INDEX dispatched_dispatched_at ON pgws_audit.dispatched (dispatched_at);
