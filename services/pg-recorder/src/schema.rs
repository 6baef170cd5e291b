//! The recorder's schema: versioned migrations applied in order under an advisory lock (so
//! replicas starting together apply each once), daily partitions created on demand (or ahead,
//! for in-transaction writes, which cannot create one), and the retention that drops old ones.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::Client;

/// The migrations, in order; each is applied once, in its own transaction.
pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "audit_tables",
        include_str!("migrations/001_audit_tables.sql"),
    ),
    (
        2,
        "dispatched_age",
        include_str!("migrations/002_dispatched_age.sql"),
    ),
    (
        3,
        "dead_letter_parts",
        include_str!("migrations/003_dead_letter_parts.sql"),
    ),
    (
        4,
        "notify_failures",
        include_str!("migrations/004_notify_failures.sql"),
    ),
];

/// Applies the migrations the database does not have yet; returns how many it applied.
pub(crate) async fn migrate(db: &mut Client) -> Result<usize, tokio_postgres::Error> {
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        let tx = db.transaction().await?;
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock(hashtext('pgws_audit.migrations'));
             CREATE SCHEMA IF NOT EXISTS pgws_audit;
             CREATE TABLE IF NOT EXISTS pgws_audit.schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM pgws_audit.schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO pgws_audit.schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            applied += 1;
            tracing::info!(version, name, "migration applied");
        }
        tx.commit().await?;
    }
    Ok(applied)
}

/// The UTC day (days since the epoch) of a unix time.
pub(crate) fn day_of(unix_seconds: f64) -> i32 {
    (unix_seconds / 86_400.0).floor() as i32
}

/// The daily partitions known to exist, so each is created once per process.
#[derive(Debug, Default)]
pub(crate) struct Partitions {
    known: HashSet<i32>,
}

impl Partitions {
    /// Makes sure a partition exists for each of `days`.
    pub(crate) async fn ensure(
        &mut self,
        db: &Client,
        days: impl IntoIterator<Item = i32>,
    ) -> Result<(), tokio_postgres::Error> {
        let missing: Vec<i32> = days
            .into_iter()
            .filter(|d| !self.known.contains(d))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        db.batch_execute("SET client_min_messages = warning")
            .await?;
        db.execute(
            "SELECT count(pgws_audit.ensure_partition(d)) FROM unnest($1::int[]) AS d",
            &[&missing],
        )
        .await?;
        self.known.extend(missing);
        Ok(())
    }

    /// Forgets what is known (after a reconnect, or after retention dropped partitions).
    pub(crate) fn forget(&mut self) {
        self.known.clear();
    }
}

/// Makes sure the partitions of yesterday, today and tomorrow (UTC, by this machine's clock,
/// which stamps the messages in one process) exist: what in-transaction writes need, made
/// ahead of them since a statement cannot create a partition of the table it writes.
pub(crate) async fn ensure_ahead(db: &Client) -> Result<(), tokio_postgres::Error> {
    let today = day_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    Partitions::default()
        .ensure(db, today - 1..=today + 1)
        .await
}

/// Drops the daily partitions of `pgws_audit.messages` wholly older than `days` days (UTC):
/// with `days = 1`, today's and yesterday's stay. Returns how many it dropped.
pub(crate) async fn drop_old_partitions(
    db: &Client,
    days: u32,
) -> Result<i32, tokio_postgres::Error> {
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    db.batch_execute("SET client_min_messages = warning")
        .await?;
    Ok(db
        .query_one(
            "SELECT pgws_audit.drop_partitions_before((now() AT TIME ZONE 'UTC')::date - $1::int)",
            &[&days],
        )
        .await?
        .get(0))
}

/// Deletes the NOTIFY failures recorded before the oldest day kept (as
/// [`drop_old_partitions`] keeps them); returns how many.
pub(crate) async fn drop_old_failures(
    db: &Client,
    days: u32,
) -> Result<u64, tokio_postgres::Error> {
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    db.execute(
        "DELETE FROM pgws_audit.notify_failures
         WHERE failed_at < ((now() AT TIME ZONE 'UTC')::date - $1::int)::timestamp AT TIME ZONE 'UTC'",
        &[&days],
    )
    .await
}

/// Deletes the dispatcher ledger's rows older than `age`; returns how many.
pub(crate) async fn prune_ledger(db: &Client, age: Duration) -> Result<u64, tokio_postgres::Error> {
    let seconds = age.as_secs_f64();
    db.execute(
        "DELETE FROM pgws_audit.dispatched WHERE dispatched_at < now() - make_interval(secs => $1)",
        &[&seconds],
    )
    .await
}

#[cfg(test)]
#[path = "schema_tests.rs"]
mod db_tests;

#[cfg(test)]
mod tests {
    use super::day_of;

    #[test]
    fn days_are_utc() {
        assert_eq!(day_of(0.0), 0);
        assert_eq!(day_of(86_399.9), 0);
        assert_eq!(day_of(86_400.0), 1);
        assert_eq!(day_of(-1.0), -1);
        assert_eq!(day_of(1_795_392_000.0), 20_780);
    }
}
