//! `pgws`: the gateway, the bridge and the recorder in one process.
//!
//! Without `PGWS_NATS_URL` the roles talk over the in-process bus ([`pgws_bus::Local`]) and
//! no connection to NATS is made; the audit needs no stream either: the bridge writes each
//! client message's row in the transaction that NOTIFYs it ([`audit`]), so the table holds
//! exactly the messages that were NOTIFYed, across a crash. With `PGWS_NATS_URL` the roles
//! talk over NATS exactly as the three service binaries do, so several `pgws` nodes (and split
//! services) on one subject prefix share channels, topics, one LISTEN leader and the audit
//! stream.
//!
//! One admin listener (`PGWS_ADMIN_PORT`, default 9100) serves `/healthz`, `/readyz` and
//! `/metrics` for the three roles. At a stop the gateway goes first (its sockets hand over what
//! they accepted), then the bridge and the recorder.

mod audit;
mod config;

use std::sync::Arc;

use anyhow::Context as _;
use pgws_service::{connect_nats, serve_admin, Host, Metrics, Readiness, Shutdown};
use tokio::net::TcpListener;

pub use config::{PgwsConfig, DEFAULT_ADMIN_PORT};

/// Runs the three roles until `shutdown.token` is cancelled, then stops the gateway first and
/// the bridge and the recorder once it handed over what its sockets accepted.
pub async fn run(config: PgwsConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    // The bridge and the recorder outlive the gateway's drain.
    let core = Shutdown::new();
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.addr))?;
    tracing::info!(addr = %admin.local_addr()?, "admin listening");

    let (host, gateway_audit, recorder) = if config.over_nats {
        let link = connect_nats(&config.gateway.nats, "pgws", &readiness)
            .await
            .context("connecting to NATS")?;
        let mut host = Host::nats(&link, metrics.clone(), readiness.clone());
        if config.gateway.history.enabled() {
            pg_bridge::keep_history(&link, &config.bridge, &core);
            let history = link.history(&config.gateway.nats.subjects.history_stream());
            host = host.with_history(Arc::new(history));
        }
        let gateway_audit = config
            .recorder
            .as_ref()
            .map(|_| ws_gateway::stream_audit(&link, &config.gateway));
        (
            host,
            gateway_audit,
            config.recorder.clone().map(|r| (r, Some(link))),
        )
    } else {
        let bus = pgws_bus::Client::new(pgws_bus::Local::new());
        let mut host = Host::local(bus, metrics.clone(), readiness.clone());
        if config.gateway.history.enabled() {
            let history = keep_in_memory(&host.bus, &config, &core).await?;
            host = host.with_history(Arc::new(history));
        }
        let gateway_audit = config
            .recorder
            .as_ref()
            .map(|_| ws_gateway::Audit::InRequest);
        (
            host,
            gateway_audit,
            config.recorder.clone().map(|r| (r, None)),
        )
    };

    // The recorder: over NATS it consumes the audit stream; in one process it keeps the tables
    // and hands the bridge the statement that writes the rows in the NOTIFY transaction.
    let mut tx_audit: Option<Arc<dyn pg_bridge::TxAudit>> = None;
    let mut recorder_task = None;
    match recorder {
        Some((recorder, Some(link))) => {
            let recording = pg_recorder::run_on_stream(recorder, link, host.clone(), core.clone());
            recorder_task = Some(tokio::spawn(recording));
        }
        Some((recorder, None)) => {
            let writer = pg_recorder::prepare_in_process(&recorder, core.clone(), &host)
                .await
                .context("preparing the audit tables")?;
            tx_audit = Some(Arc::new(audit::InTransaction(writer)));
        }
        None => {}
    }

    let (admin_readiness, admin_metrics, admin_token) =
        (readiness.clone(), metrics.clone(), core.token.clone());
    core.spawn(async move {
        if let Err(e) = serve_admin(admin, admin_readiness, admin_metrics, admin_token).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    // The bridge runs on the gateway's runtime. On a runtime of its own, the notification it
    // passes on woke the gateway's reader of the subject from another thread, which queued it
    // behind every socket task waiting in the runtime's shared queue: fanned out to 10,000
    // sockets at 50 notifications/s, the fan-out started 50 ms after the LISTEN read on average,
    // against 7 ms on one runtime (docs/benchmarks.md). Woken from the runtime's own thread, the
    // reader runs next.
    let mut bridge = {
        let (config, host, core) = (config.bridge.clone(), host.clone(), core.clone());
        tokio::spawn(async move { pg_bridge::run_on(config, host, tx_audit, core).await })
    };
    let gateway = ws_gateway::run_on(
        config.gateway,
        host.clone(),
        gateway_audit,
        shutdown.clone(),
    );
    // A role that stops on its own stops the process; the bridge stops after the gateway.
    let result = tokio::select! {
        r = gateway => {
            core.token.cancel();
            if let Err(e) = joined(bridge.await) {
                tracing::error!(error = format!("{e:#}"), "bridge");
            }
            r.context("gateway")
        }
        r = &mut bridge => {
            shutdown.token.cancel();
            joined(r).context("bridge")
        }
    };
    core.token.cancel();
    if let Some(task) = recorder_task {
        if let Err(e) = wait(task).await {
            tracing::error!(error = format!("{e:#}"), "recorder");
        }
    }
    if !core.drain(std::time::Duration::from_secs(15)).await {
        tracing::warn!("some tasks did not finish within the grace period");
    }
    pgws_service::flush_at_stop(&host.bus).await;
    result
}

/// The history of one process: every delivery on the in-process bus, kept in memory (subscribed
/// before the bridge starts, so nothing it publishes is missed).
async fn keep_in_memory(
    bus: &pgws_bus::Client,
    config: &PgwsConfig,
    core: &Shutdown,
) -> anyhow::Result<pgws_bus::MemoryHistory> {
    let limits = &config.gateway.history;
    let history = pgws_bus::MemoryHistory::new(
        limits.max_age,
        usize::try_from(limits.max_bytes).unwrap_or(usize::MAX),
    );
    for pattern in config.gateway.nats.subjects.history() {
        let subscription = bus
            .subscribe(&pattern)
            .await
            .context("subscribing the history")?;
        let (history, token) = (history.clone(), core.token.clone());
        core.spawn(async move {
            tokio::select! {
                () = history.keep_from(subscription) => {}
                () = token.cancelled() => {}
            }
        });
    }
    Ok(history)
}

/// The result of a role's task.
async fn wait(task: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    joined(task.await)
}

/// The result of a role's task that ended.
fn joined(ended: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    ended.context("the task failed")?
}
