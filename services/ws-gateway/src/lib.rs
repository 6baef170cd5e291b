//! `ws-gateway`: the edge of pgws.
//!
//! It accepts JWT-authorised websockets exactly as postgres-websockets does, turns what a
//! socket sends into the postgres-websockets envelope and hands it to the bridges over NATS,
//! and fans out what the bridges publish for a channel to the local sockets on it. It never
//! connects to PostgreSQL.
//!
//! It speaks several protocols on one port, each a module of `protocol` on one socket core:
//! postgres-websockets (the default), postgrest-ws direct channels and wspubsub topics.
//!
//! Code map: [`config`] reads settings; `server` accepts connections and upgrades; `protocol`
//! routes a handshake to its module (`handshake` finds a token); `session` registers an
//! accepted socket; `socket` runs one websocket (`transport`: its TCP connection, reset
//! instead of closed when the socket is given up); `hub` holds subscriptions and fans out;
//! `uplink` sends client messages to the bridges; `presence` keeps the leader bridge informed
//! (direct channels, topics); `limits` bounds what one client may take; `jwks` keeps the keys
//! of a JWKS URL fresh; `metrics` counts; `fuzzing` (hidden) is the fuzz targets' door to the
//! handshake.

mod config;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod hub;
mod jwks;
mod limits;
mod listen;
mod metrics;
mod presence;
mod protocol;
mod queue;
mod resume;
mod server;
mod session;
mod socket;
mod transport;
mod uplink;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgws_service::{
    await_audit_stream, connect_nats, serve_admin, Host, Metrics, NatsLink, Readiness, Shutdown,
};
use tokio::net::TcpListener;

pub use config::GatewayConfig;
pub use jwks::JwksConfig;
pub use pgws_config::DirectChannels;

use hub::Hub;
use jwks::Jwks;
use metrics::GatewayMetrics;
use presence::Presence;
use uplink::Uplink;

pub use uplink::Audit;

/// How long shutdown waits for sockets to hand over what they accepted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The largest frame read from a client; bigger frames close the socket with 1009. Frames
/// below it whose envelope exceeds the NOTIFY limit get an error frame instead.
pub(crate) const MAX_FRAME: usize = 64 * 1024;

/// What every socket shares.
pub(crate) struct Gateway {
    pub(crate) config: GatewayConfig,
    pub(crate) hub: Arc<Hub>,
    pub(crate) uplink: Uplink,
    pub(crate) presence: Presence,
    /// The fetcher of `PGWS_JWKS_URL`, when the keys come from there.
    pub(crate) jwks: Option<Arc<Jwks>>,
    pub(crate) client: pgws_bus::Client,
    /// `PGWS_MAX_CONNECTIONS_PER_ADDRESS`.
    pub(crate) per_address: Arc<limits::PerAddress>,
    /// `PGWS_MAX_HANDSHAKES_PER_ADDRESS`.
    pub(crate) handshakes: Arc<limits::PerAddress>,
    /// API keys refused per address (wspubsub publishers).
    pub(crate) key_refusals: limits::KeyRefusals,
    pub(crate) metrics: GatewayMetrics,
    pub(crate) shutdown: Shutdown,
    next_id: AtomicU64,
    /// Message ids: this process's random instance id and a counter.
    instance: u64,
    next_message: AtomicU64,
}

impl Gateway {
    /// A new message id, unique across gateways and restarts (random instance id + counter).
    pub(crate) fn message_id(&self) -> String {
        let n = self.next_message.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n:x}", self.instance)
    }
}

/// The names of the metrics this service exports, as registered (without the `pgws_` prefix):
/// the deploy tests check the dashboards and alerts against them.
pub fn metric_names() -> Vec<String> {
    let registry = pgws_service::Metrics::new();
    drop(metrics::GatewayMetrics::register(&registry));
    registry.names()
}

/// Runs the gateway until `shutdown.token` is cancelled, then closes every socket with 1001
/// after handing over what it accepted: the `ws-gateway` binary, on NATS, with its own admin
/// listener and the audit in the stack's audit stream.
pub async fn run(config: GatewayConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = Metrics::new();
    let readiness = Readiness::new();
    let link = connect_nats(&config.nats, "ws-gateway", &readiness)
        .await
        .context("connecting to NATS")?;
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.addr))?;
    tracing::info!(addr = %admin.local_addr()?, "admin listening");

    // Every readiness check is registered before the admin listener answers, so that /readyz
    // never reports fewer dependencies than it has.
    let audit = config.audit.enabled.then(|| {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        readiness.add("audit", move || flag.load(Ordering::Relaxed));
        let (js, subjects, limits) = (link.jetstream(), config.nats.subjects.clone(), config.audit);
        let token = shutdown.token.clone();
        shutdown.spawn(async move {
            if await_audit_stream(&js, &subjects, &limits, token.cancelled())
                .await
                .is_ok()
            {
                ready.store(true, Ordering::Relaxed);
            }
        });
        stream_audit(&link, &config)
    });
    let admin_token = shutdown.token.clone();
    let admin_readiness = readiness.clone();
    let admin_registry = registry.clone();
    shutdown.spawn(async move {
        if let Err(e) = serve_admin(admin, admin_readiness, admin_registry, admin_token).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    let mut host = Host::nats(&link, registry, readiness);
    if config.history.enabled() {
        let history = link.history(&config.nats.subjects.history_stream());
        host = host.with_history(Arc::new(history));
    }
    run_on(config, host, audit, shutdown).await
}

/// The audit in the stack's audit stream on `link` (JetStream): records appended before their
/// NOTIFY request leaves.
pub fn stream_audit(link: &NatsLink, config: &GatewayConfig) -> Audit {
    let subjects = &config.nats.subjects;
    Audit::Log {
        // Appends only: the ack wait is a consumer's, unused here.
        log: Arc::new(link.log(&subjects.audit_stream(), Duration::from_secs(30))),
        subject: subjects.audit(),
    }
}

/// Runs the gateway on `host`'s bus (registering its metrics and readiness there) until
/// `shutdown.token` is cancelled, then closes every socket with 1001 after handing over what
/// it accepted. `audit` is where client messages are recorded (`None`: not recorded).
pub async fn run_on(
    config: GatewayConfig,
    host: Host,
    audit: Option<Audit>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let metrics = GatewayMetrics::register(&host.metrics);
    let jwks = match config.jwks.clone() {
        Some(c) => Some(Jwks::start(c, metrics.clone(), &shutdown).await?),
        None => None,
    };
    let client = host.bus.clone();
    let tls = match &config.tls {
        Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
        None => None,
    };
    let listener = config
        .listen
        .bind()
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "websocket listening");

    let budget = hub::Budget::new(
        config.send_budget,
        config.send_queue_bytes,
        metrics.queued_bytes.clone(),
    );
    let hub = Hub::new(
        client.clone(),
        host.history.clone(),
        config.nats.subjects.clone(),
        budget,
        metrics.clone(),
        shutdown.clone(),
    );
    let instance: u64 = rand::random();
    let presence = Presence::start(
        client.clone(),
        &config.nats.subjects,
        format!("{instance:016x}"),
        metrics.presence_failures.clone(),
        &shutdown,
    );
    let resync = presence.clone();
    shutdown.spawn(Arc::clone(&hub).relay_gaps(host.reconnects.clone(), move || resync.resync()));
    shutdown.spawn(Arc::clone(&hub).relay_topic_closes());
    let uplink = Uplink::new(
        client.clone(),
        config.nats.subjects.notify(),
        config.notify_timeout,
        audit,
        config.audit_channel.clone(),
        instance,
    );
    let per_address = limits::PerAddress::new(config.max_connections_per_address);
    let handshakes = limits::PerAddress::new(config.max_handshakes_per_address);

    let gw = Arc::new(Gateway {
        config,
        hub,
        uplink,
        presence,
        jwks,
        client: client.clone(),
        per_address,
        handshakes,
        key_refusals: limits::KeyRefusals::default(),
        metrics,
        shutdown: shutdown.clone(),
        next_id: AtomicU64::new(0),
        instance,
        next_message: AtomicU64::new(0),
    });
    server::serve(
        listener,
        server::router(Arc::clone(&gw)),
        tls,
        Arc::clone(&gw),
    )
    .await;
    tracing::info!("closing sockets");
    drop(gw);
    if !shutdown.drain(SHUTDOWN_GRACE).await {
        tracing::warn!("some sockets did not finish within the grace period");
    }
    pgws_service::flush_at_stop(&client).await;
    Ok(())
}
