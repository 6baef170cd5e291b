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
//! Three ways to run it:
//! - [`run`]: the `pg-recorder` binary (its admin listener, its NATS connection, the audit
//!   stream created or brought to `PGWS_AUDIT_*`), on top of
//! - [`run_on`]: the recording loop on any [`pgws_bus::Log`] (the stream's, [`audit_log`], or
//!   a [`pgws_bus::MemoryLog`]) with the metrics and readiness of a [`Host`], inside another
//!   process;
//! - [`prepare_in_process`]: no stream and no consumer, for a process whose bridge writes the
//!   audit in the very transaction that NOTIFYs the messages: the tables and their upkeep here,
//!   and [`InTransaction`], the one statement (and its parameters) that the bridge executes.
//!   Its rows are the recorder's rows for the same envelopes; what the recorder would make a
//!   dead letter is one there too (`stream` = `in-transaction`).
//!
//! Failures: PostgreSQL away (at start or later): nothing is taken from the stream, readiness
//! says `database`, the connection is retried with backoff and the batch in hand is written
//! when it is back. A transient database error (deadlock, disk full, shutdown...): the same
//! batch again, with backoff. Any other error: the batch again record by record, the refused
//! ones becoming dead letters. Shutdown: stop pulling, write and acknowledge the batches in
//! hand (at most 15 s), hand back to the log what a pull brought after shutdown began (a
//! delayed NAK). Growth: `PGWS_RECORDER_RETENTION_DAYS` drops old daily partitions at start
//! and hourly; in dispatcher mode the ledger keeps rows for twice `PGWS_AUDIT_MAX_AGE` (no
//! record can be redelivered later than that). In-transaction writes cannot create partitions:
//! the upkeep keeps yesterday's, today's and tomorrow's made.
//!
//! Code map: `config`; `record` (parse or dead-letter; `fuzzing`, hidden, is the fuzz
//! targets' door to it); `schema` (migrations, partitions, retention); `store` (the batch
//! transaction, dispatcher SQL, error classes); `consumer` (the pull, writer and acker stages,
//! retries); `in_transaction` (the statement of in-transaction writes); `metrics`. Tests use
//! the real PostgreSQL and NATS, a database and a NATS prefix per test (`test_support`).

mod config;
mod consumer;
#[doc(hidden)]
pub mod fuzzing;
mod in_transaction;
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
use pgws_bus::{JetStreamLog, Log};
use pgws_config::DbConfig;
use pgws_service::prometheus_client::metrics::counter::Counter;
use pgws_service::prometheus_client::metrics::family::Family;
use pgws_service::{
    connect_nats, ensure_audit_stream, serve_admin, Host, Metrics, NatsLink, Readiness, Shutdown,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::RecorderConfig;
pub use in_transaction::InTransaction;

use consumer::{Database, Source};
use metrics::{InProcessMetrics, RecorderMetrics};
use store::Mode;

/// How long the audit log waits for a recorder's acknowledgement before it delivers the
/// record again (to any replica).
pub const ACK_WAIT: Duration = Duration::from_secs(30);

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

/// The recorder process: its admin listener, its NATS connection and the audit stream (created,
/// or brought to the configured limits), then [`run_on`] until `shutdown.token` is cancelled.
pub async fn run(config: RecorderConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let registry = Metrics::new();
    pg_config(&config)?;
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.addr))?;
    tracing::info!(addr = %admin.local_addr()?, "admin listening");
    let link = connect_nats(&config.nats, "pg-recorder", &readiness)
        .await
        .context("connecting to NATS")?;
    let host = Host::nats(&link, registry.clone(), readiness.clone());
    let bus = host.bus.clone();
    // Its readiness check is registered here, before the admin listener answers.
    let recording = run_on_stream(config, link, host, shutdown.clone());
    let token = shutdown.token.clone();
    shutdown.spawn(async move {
        if let Err(e) = serve_admin(admin, readiness, registry, token).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    let result = recording.await;
    pgws_service::flush_at_stop(&bus).await;
    result
}

/// The recorder on a NATS connection: makes sure the audit stream exists (created, or brought
/// to the configured limits), then [`run_on`] its log until `shutdown.token` is cancelled. The
/// `audit stream` readiness check (on `host.readiness`, failing until the stream is there) is
/// registered when this is called; the work is the future it returns.
pub fn run_on_stream(
    config: RecorderConfig,
    link: NatsLink,
    host: Host,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send {
    let stream_ready: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let flag = Arc::clone(&stream_ready);
    host.readiness.add("audit stream", move || {
        flag.load(std::sync::atomic::Ordering::Acquire)
    });
    async move {
        let give_up = shutdown.token.cancelled();
        let js = link.jetstream();
        if ensure_audit_stream(&js, &config.nats.subjects, &config.audit, give_up)
            .await
            .is_err()
        {
            return Ok(());
        }
        stream_ready.store(true, std::sync::atomic::Ordering::Release);
        let log = audit_log(&link, &config);
        run_on(config, host, Arc::new(log), shutdown).await
    }
}

/// The audit stream's log on `link` as the recorder consumes it: acknowledgements waited for
/// [`ACK_WAIT`], at most four batches (`PGWS_RECORDER_BATCH_SIZE`) of records unacknowledged
/// (when it creates the shared consumer).
fn audit_log(link: &NatsLink, config: &RecorderConfig) -> JetStreamLog {
    link.log(&config.nats.subjects.audit_stream(), ACK_WAIT)
        .with_max_ack_pending(consumer::max_ack_pending(config.batch_size))
}

/// Records what `log` holds, as the shared consumer `PGWS_NATS_PREFIX`'s recorders read it
/// (`Subjects::recorder_consumer`), until `shutdown.token` is cancelled; then finishes the
/// batch in hand (at most 15 s) and waits for the tasks of `shutdown`. Metrics go to
/// `host.metrics`, the `database` readiness check to `host.readiness`. On NATS, give it
/// [`audit_log`], as [`run`] does.
pub async fn run_on(
    config: RecorderConfig,
    host: Host,
    log: Arc<dyn Log>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let pg = pg_config(&config)?;
    let metrics = RecorderMetrics::register(&host.metrics);
    let db_up = Arc::new(AtomicBool::new(false));
    let probe = Arc::clone(&db_up);
    host.readiness
        .add("database", move || probe.load(Ordering::Relaxed));
    let source = Source {
        log,
        consumer: config.nats.subjects.recorder_consumer(),
    };
    tracing::info!(consumer = source.consumer, "recording");

    let (lag, gauge, token) = (
        source.clone(),
        metrics.pending.clone(),
        shutdown.token.clone(),
    );
    shutdown.spawn(async move { watch_lag(lag, gauge, token).await });
    let upkeep = Upkeep {
        retention_days: config.retention_days,
        ledger_age: ledger_age(&config),
        ahead: None,
    };
    if upkeep.retention_days.is_some() || upkeep.ledger_age.is_some() {
        let (pg, token) = (pg.clone(), shutdown.token.clone());
        shutdown.spawn(async move { upkeep.run(pg, token).await });
    }

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
        source,
        db,
        mode(&config),
        batch_size,
        batch_wait,
        metrics,
        loop_stop,
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
    Ok(())
}

/// Prepares the audit for a process whose bridge writes it in the transactions that NOTIFY
/// the messages (no audit stream, no consumer): connects to `config.db` (`PGWS_RETRIES`
/// attempts, as a bridge at start), applies the migrations, creates the daily partitions of
/// yesterday, today and tomorrow (UTC), and spawns on `shutdown` the upkeep that keeps them
/// ahead (hourly; every 30 s after a failure) and applies `PGWS_RECORDER_RETENTION_DAYS` and
/// the dispatcher ledger's pruning, as the recorder does. Registers the readiness check
/// `audit` (false while the last upkeep failed) and the metrics `recorder_in_transaction_records`
/// and `recorder_upkeep_runs` on `host`. Returns the statement the bridge executes
/// ([`InTransaction`]); with `PGWS_RECORDER_DISPATCHER` it calls the function instead of
/// writing `pgws_audit.messages`.
pub async fn prepare_in_process(
    config: &RecorderConfig,
    shutdown: Shutdown,
    host: &Host,
) -> anyhow::Result<InTransaction> {
    let pg = pg_config(config)?;
    let mode = mode(config);
    let metrics = InProcessMetrics::register(&host.metrics);
    let ready = Arc::new(AtomicBool::new(false));
    let probe = Arc::clone(&ready);
    host.readiness
        .add("audit", move || probe.load(Ordering::Relaxed));
    let (mut client, driver) = connect_at_start(&pg, &config.db, &shutdown.token).await?;
    let partitions = matches!(mode, Mode::Table);
    let prepared = async {
        schema::migrate(&mut client)
            .await
            .context("migrating the audit schema")?;
        if partitions {
            schema::ensure_ahead(&client)
                .await
                .context("creating the audit table's partitions")?;
        }
        anyhow::Ok(())
    }
    .await;
    drop(client);
    drop(driver.await);
    prepared?;
    ready.store(true, Ordering::Relaxed);
    let upkeep = Upkeep {
        retention_days: config.retention_days,
        ledger_age: ledger_age(config),
        ahead: Some(Ahead {
            partitions,
            ready,
            runs: metrics.upkeep_runs.clone(),
        }),
    };
    let token = shutdown.token.clone();
    shutdown.spawn(async move { upkeep.run(pg, token).await });
    tracing::info!(
        dispatcher = config.dispatcher.as_deref(),
        "audit written in the NOTIFY transactions"
    );
    Ok(InTransaction::new(mode, metrics))
}

/// `PGWS_DB_URI` as a connection configuration.
fn pg_config(config: &RecorderConfig) -> anyhow::Result<tokio_postgres::Config> {
    tokio_postgres::Config::from_str(&config.db.uri).context("invalid PGWS_DB_URI")
}

/// Messages go to the table, or to `PGWS_RECORDER_DISPATCHER`.
fn mode(config: &RecorderConfig) -> Mode {
    config
        .dispatcher
        .clone()
        .map_or(Mode::Table, Mode::Dispatcher)
}

/// Dispatcher mode: ledger rows older than twice the audit stream's max age go (no record
/// can be redelivered later than that).
fn ledger_age(config: &RecorderConfig) -> Option<Duration> {
    config.dispatcher.as_ref().map(|_| 2 * config.audit.max_age)
}

/// A connection at start: `db.retries` attempts (at least one), 1 s doubling between them.
async fn connect_at_start(
    pg: &tokio_postgres::Config,
    db: &DbConfig,
    token: &CancellationToken,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let attempts = db.retries.max(1);
    let mut attempt = 0;
    loop {
        match pg.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                let driver = tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(error = %e, "audit: database connection lost");
                    }
                });
                return Ok((client, driver));
            }
            Err(e) if attempt + 1 >= attempts => {
                return Err(e).context(format!(
                    "connecting to the database for the audit ({attempts} attempts)"
                ));
            }
            Err(e) => {
                let wait = DbConfig::backoff(attempt);
                tracing::warn!(error = %e, attempt, ?wait, "audit: database unavailable; retrying");
                attempt += 1;
                tokio::select! {
                    _ = token.cancelled() => anyhow::bail!("stopped before the database answered"),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn watch_lag(
    source: Source,
    gauge: pgws_service::prometheus_client::metrics::gauge::Gauge,
    token: CancellationToken,
) {
    loop {
        if let Ok(lag) = source.log.pending(&source.consumer).await {
            gauge.set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(LAG_EVERY) => {}
        }
    }
}

/// What the hourly upkeep does: drop old partitions, prune the dispatcher ledger; for
/// in-transaction writes also make the partitions of the coming days.
#[derive(Debug, Clone)]
struct Upkeep {
    /// `PGWS_RECORDER_RETENTION_DAYS`.
    retention_days: Option<u32>,
    /// Dispatcher mode: ledger rows older than this (twice the audit stream's max age) go.
    ledger_age: Option<Duration>,
    /// In-transaction writes ([`prepare_in_process`]).
    ahead: Option<Ahead>,
}

/// The upkeep of in-transaction writes: a NOTIFY transaction cannot create the partition its
/// row needs, so yesterday's, today's and tomorrow's are made ahead; a run that could not make
/// them is retried sooner and makes the readiness check fail.
#[derive(Debug, Clone)]
struct Ahead {
    /// Table mode (the dispatcher writes no row).
    partitions: bool,
    /// How the last run went.
    ready: Arc<AtomicBool>,
    runs: Family<[(&'static str, &'static str); 1], Counter>,
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
                        Ok(_) => self.once(&client).await,
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
            if let Some(ahead) = &self.ahead {
                ahead.ready.store(done, Ordering::Relaxed);
                let outcome = if done { "ok" } else { "failed" };
                ahead.runs.get_or_create(&[("outcome", outcome)]).inc();
            }
            let wait = if done { UPKEEP_EVERY } else { UPKEEP_RETRY };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One run; false when the partitions of in-transaction writes could not be made (the
    /// rest only logs its failures).
    async fn once(&self, client: &tokio_postgres::Client) -> bool {
        let mut done = true;
        if self.ahead.as_ref().is_some_and(|a| a.partitions) {
            if let Err(e) = schema::ensure_ahead(client).await {
                tracing::warn!(error = %e, "upkeep: the coming days' partitions could not be made");
                done = false;
            }
        }
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
        done
    }
}
