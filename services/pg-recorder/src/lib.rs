//! `pg-recorder`: every accepted client message, recorded in a table exactly once.
//!
//! The gateways publish each accepted message (and connection event) to the audit stream (a
//! JetStream work queue, see `proto/CONTRACT.md`). Every recorder replica pulls from one shared
//! durable consumer, writes a batch in one transaction into `pgws_audit.messages` (daily
//! partitions, primary key = message id + time, so redeliveries change nothing), keeps what it
//! cannot parse or the database refuses in `pgws_audit.dead_letters` (same transaction), and
//! acknowledges the batch only after COMMIT. So a record survives a recorder crash, a
//! PostgreSQL restart or a NATS restart, and is written once. With
//! `PGWS_RECORDER_DISPATCHER=f` it calls `f(notify_channel, envelope)` for each new record
//! instead, in stream order, in the same transaction as the ledger row
//! (`pgws_audit.dispatched`) that makes the call happen once (diogob/pg-recorder's `-f`,
//! without its losses).
//!
//! Failures: PostgreSQL away (at start or later): nothing is taken from the stream, readiness
//! says `database`, the connection is retried with backoff and the batch in hand is written
//! when it is back. A transient database error (deadlock, disk full, shutdown...): the same
//! batch again, with backoff. Any other error: the batch again record by record, the refused
//! ones becoming dead letters. Shutdown: stop pulling, write and acknowledge the batches in
//! hand (at most 15 s), hand the buffered rest back to the server (a delayed NAK).
//! Growth: `PGWS_RECORDER_RETENTION_DAYS` drops old daily partitions at start and hourly; in
//! dispatcher mode the ledger keeps rows for twice `PGWS_AUDIT_MAX_AGE` (no record can be
//! redelivered later than that).
//!
//! Code map: `config`; `record` (parse or dead-letter; `fuzzing`, hidden, is the fuzz
//! targets' door to it); `schema` (migrations, partitions, retention); `store` (the batch
//! transaction, dispatcher SQL, error classes); `consumer` (the pull and writer stages,
//! retries); `metrics`. Tests use the real PostgreSQL and NATS, a database and a NATS prefix
//! per test (`test_support`).

mod config;
mod consumer;
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod record;
mod schema;
#[cfg(test)]
mod service_tests;
mod store;
#[cfg(test)]
mod test_support;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgws_service::{connect_nats, ensure_audit_stream, serve_admin, Metrics, Readiness, Shutdown};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::RecorderConfig;

use consumer::Database;
use metrics::RecorderMetrics;
use store::Mode;

/// How long shutdown waits for the batch in hand.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// How often the lag gauge is refreshed, and how often the upkeep (retention) runs.
const LAG_EVERY: Duration = Duration::from_secs(5);
const UPKEEP_EVERY: Duration = Duration::from_secs(3600);
/// How soon the upkeep tries again when the database was unavailable.
const UPKEEP_RETRY: Duration = Duration::from_secs(30);

/// The names of the metrics this service exports, as registered (without the `pgws_` prefix):
/// the deploy tests check the dashboards and alerts against them.
pub fn metric_names() -> Vec<String> {
    let registry = pgws_service::Metrics::new();
    drop(metrics::RecorderMetrics::register(&registry));
    registry.names()
}

/// Runs until `shutdown.token` is cancelled, then finishes the batch in hand.
pub async fn run(config: RecorderConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = Metrics::new();
    let metrics = RecorderMetrics::register(&registry);
    let pg = tokio_postgres::Config::from_str(&config.db.uri).context("invalid PGWS_DB_URI")?;
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.addr))?;
    tracing::info!(addr = %admin.local_addr()?, "admin listening");
    let client = connect_nats(&config.nats, "pg-recorder", &readiness)
        .await
        .context("connecting to NATS")?;
    let db_up = Arc::new(AtomicBool::new(false));
    let probe = Arc::clone(&db_up);
    readiness.add("database", move || probe.load(Ordering::Relaxed));
    let token = shutdown.token.clone();
    let (r, m) = (readiness.clone(), registry.clone());
    shutdown.spawn(async move {
        if let Err(e) = serve_admin(admin, r, m, token).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    let js = async_nats::jetstream::new(client.clone());
    let subjects = &config.nats.subjects;
    if ensure_audit_stream(&js, subjects, &config.audit, shutdown.token.cancelled())
        .await
        .is_err()
    {
        return Ok(());
    }
    let consumer = loop {
        match consumer::consumer(
            &js,
            &subjects.audit_stream(),
            &subjects.recorder_consumer(),
            config.batch_size,
        )
        .await
        {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = e, "audit consumer not ready");
                tokio::select! {
                    _ = shutdown.token.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::info!(consumer = subjects.recorder_consumer(), "recording");

    let lag_consumer = consumer.clone();
    let (gauge, token) = (metrics.pending.clone(), shutdown.token.clone());
    shutdown.spawn(async move { watch_lag(lag_consumer, gauge, token).await });
    let upkeep = Upkeep {
        retention_days: config.retention_days,
        ledger_age: config.dispatcher.as_ref().map(|_| 2 * config.audit.max_age),
    };
    if upkeep.retention_days.is_some() || upkeep.ledger_age.is_some() {
        let (pg, token) = (pg.clone(), shutdown.token.clone());
        shutdown.spawn(async move { upkeep.run(pg, token).await });
    }

    let mode = config
        .dispatcher
        .clone()
        .map_or(Mode::Table, Mode::Dispatcher);
    let db = Database {
        pg,
        client: None,
        up: db_up,
        partitions: schema::Partitions::default(),
        attempt: 0,
    };
    // The loop gets its own token: it stops taking batches on shutdown but finishes the one in
    // hand; the grace period bounds how long that may take.
    let stop = CancellationToken::new();
    let loop_stop = stop.clone();
    let (batch_size, batch_wait) = (config.batch_size, config.batch_wait);
    let recording = shutdown.tracker.spawn(consumer::run(
        consumer, db, mode, batch_size, batch_wait, metrics, loop_stop,
    ));
    shutdown.token.cancelled().await;
    stop.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, recording)
        .await
        .is_err()
    {
        tracing::warn!(
            "the batch in hand did not finish within the grace period; it will be redelivered"
        );
    }
    shutdown.drain(SHUTDOWN_GRACE).await;
    pgws_service::flush_at_stop(&client).await;
    Ok(())
}

async fn watch_lag(
    mut consumer: async_nats::jetstream::consumer::Consumer<
        async_nats::jetstream::consumer::pull::Config,
    >,
    gauge: pgws_service::prometheus_client::metrics::gauge::Gauge,
    token: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            let lag = info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0);
            gauge.set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(LAG_EVERY) => {}
        }
    }
}

/// What the hourly upkeep does: drop old partitions, prune the dispatcher ledger.
#[derive(Debug, Clone, Copy)]
struct Upkeep {
    /// `PGWS_RECORDER_RETENTION_DAYS`.
    retention_days: Option<u32>,
    /// Dispatcher mode: ledger rows older than this (twice the audit stream's max age) go.
    ledger_age: Option<Duration>,
}

impl Upkeep {
    /// At start, then every hour, on its own connection.
    async fn run(self, pg: tokio_postgres::Config, token: CancellationToken) {
        loop {
            let done = match pg.connect(tokio_postgres::NoTls).await {
                Ok((mut client, conn)) => {
                    let driver = tokio::spawn(conn);
                    // The writer may not have migrated yet (the database was down).
                    let done = match schema::migrate(&mut client).await {
                        Ok(_) => {
                            self.once(&client).await;
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upkeep: migrations failed");
                            false
                        }
                    };
                    drop(client);
                    drop(driver.await);
                    done
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upkeep: database unavailable");
                    false
                }
            };
            let wait = if done { UPKEEP_EVERY } else { UPKEEP_RETRY };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn once(&self, client: &tokio_postgres::Client) {
        if let Some(days) = self.retention_days {
            match schema::drop_old_partitions(client, days).await {
                Ok(dropped) => tracing::info!(dropped, days, "retention applied"),
                Err(e) => tracing::warn!(error = %e, "retention failed"),
            }
            match schema::drop_old_failures(client, days).await {
                Ok(deleted) => tracing::info!(deleted, days, "notify failures pruned"),
                Err(e) => tracing::warn!(error = %e, "notify failure retention failed"),
            }
        }
        if let Some(age) = self.ledger_age {
            match schema::prune_ledger(client, age).await {
                Ok(deleted) => tracing::info!(deleted, "dispatcher ledger pruned"),
                Err(e) => tracing::warn!(error = %e, "dispatcher ledger prune failed"),
            }
        }
    }
}
