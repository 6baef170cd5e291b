//! pg-bridge: the only part of pgws that holds LISTEN and NOTIFY connections.
//!
//! Gateways never touch PostgreSQL; they talk to the bridges over the bus ([`pgws_bus`]: NATS
//! between processes, or the in-process bus when every role runs in one process, [`run_on`]).
//! Several bridges run against one NATS and one database. Every bridge serves the requests any
//! bridge may answer:
//! - **NOTIFY** ([`notifier`](crate::notifier)): `<prefix>.notify` as a queue group, executing
//!   the requests' `pg_notify` calls in batched transactions on a pool of `PGWS_POOL_SIZE`
//!   connections and replying after commit (at most once: [`dedup`](crate::dedup)); in one
//!   process, the requests' audit records are written in the same transactions
//!   ([`TxAudit`]).
//! - **API keys** ([`keys`](crate::keys)): wspubsub key checks.
//! - **`/live` topics** ([`live_topics`](crate::live_topics)): custom topics kept in
//!   `pgws_live.topics`, and the permission class of a table topic's reader
//!   ([`live_tables`](crate::live_tables)).
//!
//! One bridge at a time, elected ([`leader`](crate::leader)) with a PostgreSQL advisory lock
//! held by its LISTEN session (read through [`wire`](crate::wire)), does what must run once
//! per stack ([`listener`](crate::listener)): it publishes every notification of
//! `PGWS_LISTEN_CHANNEL` to `<prefix>.deliver.<channel>`, LISTENs on the direct channels the
//! gateways report and publishes their notifications to `<prefix>.direct.<channel>`, keeps the
//! registry of direct channels, wspubsub topics and `/live` table classes
//! ([`registry`](crate::registry), [`standing`](crate::standing)), and runs the change
//! capture of `/live` table topics ([`capture`](crate::capture)).
//!
//! Differences from postgres-websockets, on purpose: a lost LISTEN connection is always
//! re-established (1 s doubling up to 32 s, forever) instead of ending the process; a
//! `PGWS_CHECK_LISTENER_INTERVAL` only adds a `SELECT 1` probe that detects a silent
//! connection sooner. Start-up keeps the reference's rule: the first connection is attempted
//! `PGWS_RETRIES` times, then the process exits with an error. NOTIFY errors are never
//! dropped silently: the request is answered `failed` and the gateway retries it.
//!
//! Admin endpoints (default port 9101, served by [`run`]; the process serves them for
//! [`run_on`]): `/readyz` checks `nats` (with [`run`]), `listener` (not the leader, or the
//! leader with its LISTEN connection up), `registry` (not a leader still waiting for the
//! gateways' reports) and `database` (some NOTIFY connection up).

mod audit;
mod batch;
mod bus;
mod capture;
mod config;
mod db;
mod dedup;
#[doc(hidden)]
pub mod fuzzing;
mod keys;
mod leader;
mod listener;
mod live_tables;
mod live_topics;
mod metrics;
mod notifier;
mod registry;
mod routing;
mod standing;
mod wire;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use pgws_service::{
    connect_nats, ensure_history_stream, flush_at_stop, serve_admin, Host, Metrics, NatsLink,
    Readiness, Shutdown,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use audit::TxAudit;
pub use config::{BridgeConfig, DEFAULT_BATCH_SIZE, DEFAULT_POOL_SIZE, MAX_POOL_SIZE};

use keys::Keys;
use leader::{Election, LeaderState};
use listener::Listener;
use metrics::BridgeMetrics;
use notifier::Notifier;

/// How long shutdown waits for the tasks to finish their work (batches in hand, replies).
const DRAIN_GRACE: Duration = Duration::from_secs(15);

/// The names of the metrics this service exports, as registered (without the `pgws_` prefix):
/// the deploy tests check the dashboards and alerts against them.
pub fn metric_names() -> Vec<String> {
    let registry = pgws_service::Metrics::new();
    drop(metrics::BridgeMetrics::register(&registry));
    registry.names()
}

/// Runs the bridge as its own process until `shutdown.token` is cancelled: serves its admin
/// listener, connects to NATS, runs [`run_on`] there (which drains), then flushes what is
/// still to be sent to NATS. Returns an error when start-up fails (the admin listener cannot
/// bind, the database stays unreachable for `PGWS_RETRIES` attempts) or when a component
/// stops on its own.
pub async fn run(config: BridgeConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let host = match start(&config, &shutdown, metrics, readiness).await {
        Ok(host) => host,
        Err(e) => {
            shutdown.token.cancel();
            drain(&shutdown).await;
            return Err(e);
        }
    };
    let bus = host.bus.clone();
    let result = run_on(config, host, None, shutdown).await;
    flush_at_stop(&bus).await;
    result
}

/// Makes sure the stack's history stream exists with the configured limits (in the
/// background, retrying while NATS is away), when history is kept: the bridges own it, as
/// what it keeps is what the leader publishes.
pub fn keep_history(link: &NatsLink, config: &BridgeConfig, shutdown: &Shutdown) {
    if !config.history.enabled() {
        return;
    }
    let (js, subjects, history) = (
        link.jetstream(),
        config.nats.subjects.clone(),
        config.history,
    );
    let token = shutdown.token.clone();
    shutdown.spawn(async move {
        drop(ensure_history_stream(&js, &subjects, &history, token.cancelled()).await);
    });
}

/// The admin listener (spawned on `shutdown`) and the NATS connection of a bridge process.
async fn start(
    config: &BridgeConfig,
    shutdown: &Shutdown,
    metrics: Metrics,
    readiness: Readiness,
) -> anyhow::Result<Host> {
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("cannot bind the admin listener on {}", config.admin.addr))?;
    let addr = admin.local_addr().context("admin listener address")?;
    tracing::info!(addr = %addr, "admin listening");
    let (r, m, t) = (readiness.clone(), metrics.clone(), shutdown.token.clone());
    shutdown.spawn(async move {
        if let Err(e) = serve_admin(admin, r, m, t).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    let link = connect_nats(&config.nats, "pg-bridge", &readiness)
        .await
        .context("cannot connect to NATS")?;
    keep_history(&link, config, shutdown);
    Ok(Host::nats(&link, metrics, readiness))
}

/// Runs the bridge on `host` (its bus; its metrics and readiness checks registered on the
/// host's, which the process serves) until `shutdown.token` is cancelled, then drains: no new
/// requests, batches in hand executed and answered, leadership released, every task of
/// `shutdown` ended (give the bridge a [`Shutdown`] of its own when it shares a process). With
/// `audit`, the NOTIFY requests' audit records are written in the transactions that NOTIFY
/// their messages ([`TxAudit`]). Flushing the bus at the end is the caller's. Returns an error
/// when start-up fails (the database stays unreachable for `PGWS_RETRIES` attempts) or when a
/// component stops on its own.
pub async fn run_on(
    config: BridgeConfig,
    host: Host,
    audit: Option<Arc<dyn TxAudit>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let result = serve(config, host, audit, &shutdown).await;
    shutdown.token.cancel();
    drain(&shutdown).await;
    result
}

/// Waits for the tasks of `shutdown`, at most [`DRAIN_GRACE`].
async fn drain(shutdown: &Shutdown) {
    if !shutdown.drain(DRAIN_GRACE).await {
        tracing::warn!(
            grace_s = DRAIN_GRACE.as_secs(),
            "tasks still running after the grace period"
        );
    }
}

/// Starts everything on `host` and waits for shutdown or a fatal error.
async fn serve(
    config: BridgeConfig,
    host: Host,
    audit: Option<Arc<dyn TxAudit>>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let Host {
        bus,
        metrics,
        readiness,
        ..
    } = host;
    let bridge_metrics = BridgeMetrics::register(&metrics);
    let pg = db::pg_config(&config.db.uri).context("invalid PGWS_DB_URI")?;

    // Not ready until a NOTIFY connection is up, also while the first connection is tried.
    let db_up: Arc<OnceLock<watch::Receiver<usize>>> = Arc::default();
    let probe = Arc::clone(&db_up);
    readiness.add("database", move || {
        probe.get().is_some_and(|up| *up.borrow() > 0)
    });
    let Some(first) = db::connect_first(
        &pg,
        &bridge_metrics.notifications_mended,
        config.db.retries,
        &shutdown.token,
    )
    .await?
    else {
        return Ok(());
    };
    tracing::info!("database connected");

    let state = Arc::new(LeaderState::default());
    let ready = state.clone();
    readiness.add("listener", move || ready.ready());
    // A leader waiting for the gateways' reports cannot answer wspubsub handshakes yet.
    let settling: Arc<AtomicBool> = Arc::default();
    let waiting = Arc::clone(&settling);
    readiness.add("registry", move || !waiting.load(Ordering::Acquire));
    let election = Election {
        pg: pg.clone(),
        key: config.nats.subjects.leader_lock_key(),
        metrics: bridge_metrics.clone(),
        state,
        duty: Listener {
            channel: config.listen_channel.clone(),
            check_interval: config.check_listener_interval,
            subjects: config.nats.subjects.clone(),
            bus: bus.clone(),
            metrics: bridge_metrics.clone(),
            grace: config.pubsub_grace,
            direct: config.direct_channels.clone(),
            linger: if config.history.enabled() {
                config.history.max_age
            } else {
                Duration::ZERO
            },
            classes: watch::channel(Arc::default()).0,
            capture: (!config.table_topics.is_empty()).then(|| {
                Arc::new(capture::Capture {
                    pg: pg.clone(),
                    slot: config.capture_slot.clone(),
                    patterns: config.table_topics.clone(),
                    subjects: config.nats.subjects.clone(),
                    bus: bus.clone(),
                    metrics: bridge_metrics.clone(),
                    settle: registry::settle(),
                })
            }),
            settling,
        },
    };
    shutdown.spawn(election.run(first, shutdown.token.clone()));

    let (fatal_tx, mut fatal_rx) = mpsc::channel(1);
    let keys = Keys {
        pg: pg.clone(),
        table: config.pubsub_keys_table.clone(),
        subjects: config.nats.subjects.clone(),
        bus: bus.clone(),
        metrics: bridge_metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let live_topics = live_topics::LiveTopics {
        pg: pg.clone(),
        subjects: config.nats.subjects.clone(),
        bus: bus.clone(),
        shutdown: shutdown.clone(),
        tables: config.table_topics.clone(),
        per_subscriber: config.class_per_subscriber,
    };
    let (topics_fatal, token) = (fatal_tx.clone(), shutdown.token.clone());
    shutdown.spawn(async move {
        if let Err(e) = live_topics.run(token).await {
            let _ = topics_fatal.try_send(e);
        }
    });
    let (keys_fatal, token) = (fatal_tx.clone(), shutdown.token.clone());
    shutdown.spawn(async move {
        if let Err(e) = keys.run(token).await {
            let _ = keys_fatal.try_send(e);
        }
    });
    let notifier = Notifier {
        pg,
        subjects: config.nats.subjects.clone(),
        pool_size: config.pool_size,
        batch_size: config.batch_size,
        bus,
        metrics: bridge_metrics,
        dedup: config.notify_dedup,
        audit,
    };
    let up = notifier.spawn(shutdown, fatal_tx);
    drop(db_up.set(up));

    tokio::select! {
        _ = shutdown.token.cancelled() => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
    }
}

#[cfg(test)]
mod test_support;
