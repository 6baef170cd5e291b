//! Whether a new leader must wait for the gateways before answering topic questions.
//!
//! The leader's registry lives in memory; what it knew of wspubsub topics is rebuilt from the
//! gateways' reports after a failover, so a new leader answers `Retry` for a few seconds
//! ([`crate::registry::settle`]) where the answer depends on topics it may not know yet. That
//! wait is only needed when an earlier leader knew of topics: the leader keeps one flag in
//! `pgws_bridge.registry` (a row per stack, keyed by its advisory lock key), written before a
//! claim that makes its first topic is granted and cleared when its last topic is gone. A
//! leader that finds no row, or the flag clear, answers at once: no gateway can hold a topic
//! that no leader granted. When the table cannot be read or created, every new leader waits,
//! as before.

use tokio_postgres::Client;

/// The table of flags.
pub(crate) const TABLE: &str = "pgws_bridge.registry";

/// Whether the stack of `key` may hold topics an earlier leader knew; creates the table when
/// missing (needs the CREATE privilege only then).
pub(crate) async fn read(client: &Client, key: i64) -> Result<bool, tokio_postgres::Error> {
    crate::db::ensure_table(
        client,
        TABLE,
        "CREATE SCHEMA IF NOT EXISTS pgws_bridge;
         CREATE TABLE IF NOT EXISTS pgws_bridge.registry (
             lock_key bigint PRIMARY KEY,
             topics boolean NOT NULL,
             at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let row = client
        .query_opt(
            "SELECT topics FROM pgws_bridge.registry WHERE lock_key = $1",
            &[&key],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// The statement that records whether the stack of `key` holds topics now.
pub(crate) fn write(key: i64, topics: bool) -> String {
    format!(
        "INSERT INTO pgws_bridge.registry (lock_key, topics) VALUES ({key}, {topics})
         ON CONFLICT (lock_key) DO UPDATE SET topics = EXCLUDED.topics, at = now()"
    )
}
