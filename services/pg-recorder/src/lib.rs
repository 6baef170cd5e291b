//! `pg-recorder`: every accepted client message, recorded in a table exactly once.
//!
//! The gateways publish each accepted message (and connection event) to the audit stream (a
//! JetStream work queue, see `proto/CONTRACT.md`). Every recorder replica pulls from one shared
//! durable consumer, writes a batch in one transaction into `pgws_audit.messages` (daily
//! partitions, primary key = message id + time, so redeliveries change nothing), keeps what it
//! cannot parse in `pgws_audit.dead_letters`, and acknowledges the batch only after COMMIT.
//! So a record survives a recorder crash, a PostgreSQL restart or a NATS restart, and is
//! written once. With `PGWS_RECORDER_DISPATCHER=f` it calls `f(channel, payload)` for each
//! new record instead, in order, in the same transaction as the ledger row that makes the call
//! happen once (diogob/pg-recorder's `-f`, without its losses).
//!
//! Code map: `config`; `record` (parse or dead-letter); `schema` (migrations, partitions,
//! retention); `store` (the batch transaction); `consumer` (the loop); `metrics`.

mod config;
mod consumer;
mod metrics;
mod record;
mod schema;
mod store;

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
/// How often the lag gauge and the retention run.
const LAG_EVERY: Duration = Duration::from_secs(5);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

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
    let client = connect_nats(&config.nats.url, "pg-recorder", &readiness)
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
    if let Some(days) = config.retention_days {
        let (pg, token) = (pg.clone(), shutdown.token.clone());
        shutdown.spawn(async move { retention(pg, days, token).await });
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
    let recording = tokio::spawn(consumer::run(
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
    client.flush().await.context("flushing NATS")?;
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

async fn retention(pg: tokio_postgres::Config, days: u32, token: CancellationToken) {
    loop {
        match pg.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                let driver = tokio::spawn(conn);
                match schema::apply_retention(&client, days).await {
                    Ok(dropped) => tracing::info!(dropped, days, "retention applied"),
                    Err(e) => tracing::warn!(error = %e, "retention failed"),
                }
                drop(client);
                drop(driver.await);
            }
            Err(e) => tracing::warn!(error = %e, "retention: database unavailable"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(RETENTION_EVERY) => {}
        }
    }
}
