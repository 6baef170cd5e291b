//! `pg-recorder`: will consume the audit stream of client messages into PostgreSQL tables.
//!
//! For now it is the service's skeleton: it validates its configuration, connects to NATS and
//! PostgreSQL (keeping the database connection healthy), serves `/healthz`, `/readyz` (NATS and
//! PostgreSQL connected) and `/metrics`, and stops on SIGTERM. The consumer comes with the audit
//! stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgws_config::{AdminConfig, ConfigError, DbConfig, NatsConfig, Problems, Settings};
use pgws_service::{connect_nats, serve_admin, Metrics, Readiness, Shutdown};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The recorder's configuration.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// `PGWS_DB_URI`, `PGWS_RETRIES`.
    pub db: DbConfig,
    /// `PGWS_NATS_URL`, `PGWS_NATS_PREFIX`.
    pub nats: NatsConfig,
    /// Admin listener (default port 9102).
    pub admin: AdminConfig,
}

impl RecorderConfig {
    /// Reads and validates the settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut p = Problems::new(settings);
        let db = DbConfig::read(&mut p);
        let nats = NatsConfig::read(&mut p);
        let admin = AdminConfig::read(&mut p, 9102);
        p.finish(Self { db, nats, admin })
    }
}

/// Runs until `shutdown.token` is cancelled.
pub async fn run(config: RecorderConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    let metrics = Metrics::new();
    let client = connect_nats(&config.nats.url, "pg-recorder", &readiness)
        .await
        .context("connecting to NATS")?;
    let db_up = Arc::new(AtomicBool::new(false));
    let probe = Arc::clone(&db_up);
    readiness.add("database", move || probe.load(Ordering::Relaxed));
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.addr))?;
    tracing::info!(addr = %admin.local_addr()?, "admin listening");
    let token = shutdown.token.clone();
    shutdown.spawn(async move {
        if let Err(e) = serve_admin(admin, readiness, metrics, token).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    let token = shutdown.token.clone();
    let uri = config.db.uri.clone();
    shutdown.spawn(async move { keep_connected(&uri, &db_up, &token).await });
    shutdown.token.cancelled().await;
    shutdown.drain(Duration::from_secs(10)).await;
    client.flush().await.context("flushing NATS")?;
    Ok(())
}

/// Holds one database connection, reconnecting with backoff, so readiness tells the truth.
async fn keep_connected(uri: &str, up: &AtomicBool, token: &CancellationToken) {
    let mut attempt = 0;
    while !token.is_cancelled() {
        match tokio_postgres::connect(uri, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                attempt = 0;
                up.store(true, Ordering::Relaxed);
                tracing::info!("database connected");
                tokio::select! {
                    _ = token.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::warn!(error = %e, "database connection lost");
                    },
                }
                drop(client);
                up.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "database connection failed");
                let wait = DbConfig::backoff(attempt);
                attempt += 1;
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
