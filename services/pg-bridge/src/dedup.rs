//! At-most-once NOTIFY requests across every bridge of a stack.
//!
//! A gateway retries a NOTIFY request that got no answer in time, and the first copy may
//! still be waiting in a stalled bridge (or have committed just before its bridge died), so a
//! request can reach PostgreSQL twice, through two bridges. Requests carry an id; the
//! transaction that NOTIFYs a request also inserts its key into the unlogged table
//! `pgws_bridge.notify_requests`, and skips the NOTIFYs of a key that is already there. The
//! unique index makes this hold across bridges: a second insert of the key waits for the
//! first transaction and then finds the row (committed: skip) or not (rolled back: go on).
//!
//! A key is the request id and the index of the request's first notification in the
//! transaction: a request is only split across transactions where it repeats a
//! `(channel, payload)` pair itself ([`crate::batch::plan`]), which depends on the request
//! alone, so every copy of a request is split at the same places and each part is executed
//! once. Rows are kept until the request's deadline plus [`KEEP_AFTER_DEADLINE`] (a request is
//! never started past its deadline, so no copy can come later) and then deleted by
//! [`cleanup`]. The table is unlogged: a database crash empties it, which only reopens the
//! window for requests retried across the crash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

/// The table of executed request keys.
pub(crate) const TABLE: &str = "pgws_bridge.notify_requests";

/// How long a key outlives its request's deadline: covers clock skew between the gateway, the
/// bridge and the database.
pub(crate) const KEEP_AFTER_DEADLINE: Duration = Duration::from_secs(60);

/// How long a request without a deadline keeps its key.
const KEEP_WITHOUT_DEADLINE: Duration = Duration::from_secs(600);

/// Longest request id accepted (a gateway's is about 30 bytes).
pub(crate) const MAX_ID: usize = 128;

/// The NOTIFYs of one transaction, skipping those whose key is already recorded.
/// `$1`, `$2`: channels and payloads; `$3`: each notification's key (NULL: not deduplicated);
/// `$4`, `$5`: the distinct keys and their expiry (unix seconds). The keys' array is built
/// before the scan, so the scan keeps `unnest`'s order.
pub(crate) const NOTIFY_SQL: &str = "WITH fresh AS (
    INSERT INTO pgws_bridge.notify_requests (key, expires)
    SELECT k, to_timestamp(e) FROM unnest($4::text[], $5::float8[]) AS d(k, e)
    ON CONFLICT (key) DO NOTHING
    RETURNING key)
SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[], $3::text[]) AS t(c, p, k)
WHERE k IS NULL OR k = ANY (ARRAY(SELECT key FROM fresh))";

/// The NOTIFYs of one transaction without deduplication (`PGWS_NOTIFY_DEDUP=false`): `$1`,
/// `$2` as in [`NOTIFY_SQL`].
pub(crate) const PLAIN_NOTIFY_SQL: &str =
    "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)";

/// Creates the schema and table when missing. Only needs the CREATE privilege when they are
/// missing: a database administrator may create them beforehand (README, "pg-bridge").
pub(crate) async fn ensure(client: &Client) -> Result<(), tokio_postgres::Error> {
    crate::db::ensure_table(
        client,
        TABLE,
        "CREATE SCHEMA IF NOT EXISTS pgws_bridge;
         CREATE UNLOGGED TABLE IF NOT EXISTS pgws_bridge.notify_requests (
             key text PRIMARY KEY,
             expires timestamptz NOT NULL
         )",
    )
    .await
}

/// Deletes the keys whose requests can no longer arrive; returns how many.
pub(crate) async fn cleanup(client: &Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM pgws_bridge.notify_requests WHERE expires < now()",
            &[],
        )
        .await
}

/// The key of a request's part starting at notification `first`.
pub(crate) fn key(id: &str, first: usize) -> String {
    format!("{id}/{first}")
}

/// When a key may be forgotten, as unix seconds.
pub(crate) fn expiry(deadline: Option<SystemTime>) -> f64 {
    let at = match deadline {
        Some(d) => d + KEEP_AFTER_DEADLINE,
        None => SystemTime::now() + KEEP_WITHOUT_DEADLINE,
    };
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_request_and_its_part() {
        assert_eq!(key("abc-r1", 0), "abc-r1/0");
        assert_eq!(key("abc-r1", 5), "abc-r1/5");
    }

    #[test]
    fn keys_outlive_the_deadline() {
        let deadline = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(expiry(Some(deadline)), 1_060.0);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(expiry(None) >= now.as_secs_f64() + 599.0);
    }
}
