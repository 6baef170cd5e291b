//! `ws-gateway`: the edge of pgws.
//!
//! It accepts JWT-authorised websockets exactly as postgres-websockets does, turns what a
//! socket sends into the postgres-websockets envelope and hands it to the bridges over NATS,
//! and fans out what the bridges publish for a channel to the local sockets on it. It never
//! connects to PostgreSQL.
//!
//! Code map: [`config`] reads settings; `handshake` finds the token; `server` accepts
//! connections and upgrades; `socket` runs one websocket; `hub` holds channel membership and
//! fans out; `uplink` sends client messages to the bridges; `metrics` counts.

mod config;
mod handshake;
mod hub;
mod listen;
mod metrics;
mod server;
mod socket;
mod uplink;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgws_auth::Grant;
use pgws_service::{
    connect_nats_watched, ensure_audit_stream, serve_admin, Metrics, Readiness, Shutdown,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::GatewayConfig;

use hub::{Hub, Subscriber};
use metrics::GatewayMetrics;
use socket::Session;
use uplink::{Audit, Uplink};

/// The token claim that asks for gap signals (`"gaps": true`).
const GAPS_CLAIM: &str = "gaps";

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
    pub(crate) metrics: GatewayMetrics,
    pub(crate) shutdown: Shutdown,
    next_id: AtomicU64,
    /// Message ids: this process's random instance id and a counter.
    instance: u64,
    next_message: AtomicU64,
}

/// A socket's channel memberships; leaving them happens on drop, so a handshake whose upgrade
/// never completes leaves no trace.
pub(crate) struct Membership {
    pub(crate) gw: Arc<Gateway>,
    id: u64,
    channels: Vec<String>,
    gaps: bool,
    protocol: &'static str,
}

impl Drop for Membership {
    fn drop(&mut self) {
        for channel in &self.channels {
            self.gw.hub.leave(channel, self.id);
        }
        if self.gaps {
            self.gw.hub.unwatch_gaps(self.id);
        }
        self.gw
            .metrics
            .connections_open
            .get_or_create(&[("protocol", self.protocol)])
            .dec();
    }
}

/// An accepted handshake, before its upgrade completes.
pub(crate) struct Accepted {
    pub(crate) membership: Membership,
    pub(crate) session: Session,
}

impl Gateway {
    /// A new message id, unique across gateways and restarts (random instance id + counter).
    pub(crate) fn message_id(&self) -> String {
        let n = self.next_message.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n:x}", self.instance)
    }

    /// Registers an authorised socket: joins its channels (when it may read) and waits until
    /// their subscriptions are live.
    pub(crate) async fn accept(self: &Arc<Self>, grant: Grant) -> Accepted {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.send_queue);
        let kick = self.shutdown.token.child_token();
        let protocol = "postgres-websockets";
        self.metrics
            .connections_open
            .get_or_create(&[("protocol", protocol)])
            .inc();
        self.metrics
            .connections_total
            .get_or_create(&[("protocol", protocol)])
            .inc();
        let channels = if grant.mode.can_read() {
            grant.channels.clone()
        } else {
            Vec::new()
        };
        // Opt-in: only sockets whose token asks for gap signals get them.
        let gaps = !channels.is_empty()
            && grant.claims.get(GAPS_CLAIM) == Some(&serde_json::Value::Bool(true));
        let membership = Membership {
            gw: Arc::clone(self),
            id,
            channels,
            gaps,
            protocol,
        };
        if gaps {
            let sub = Subscriber {
                tx: tx.clone(),
                kick: kick.clone(),
            };
            self.hub.watch_gaps(id, sub);
        }
        for channel in &membership.channels {
            let sub = Subscriber {
                tx: tx.clone(),
                kick: kick.clone(),
            };
            self.hub.join(channel, id, sub).await;
        }
        drop(tx);
        Accepted {
            membership,
            session: Session { grant, rx, kick },
        }
    }
}

/// Runs the gateway until `shutdown.token` is cancelled, then closes every socket with 1001
/// after handing over what it accepted.
pub async fn run(config: GatewayConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = Metrics::new();
    let readiness = Readiness::new();
    let metrics = GatewayMetrics::register(&registry);
    let (client, reconnects) = connect_nats_watched(&config.nats.url, "ws-gateway", &readiness)
        .await
        .context("connecting to NATS")?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
        None => None,
    };
    let admin = TcpListener::bind(config.admin.addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.addr))?;
    tracing::info!(addr = %admin.local_addr()?, "admin listening");
    let listener = config
        .listen
        .bind()
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "websocket listening");

    let admin_token = shutdown.token.clone();
    let admin_readiness = readiness.clone();
    shutdown.spawn(async move {
        if let Err(e) = serve_admin(admin, admin_readiness, registry, admin_token).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    let hub = Hub::new(
        client.clone(),
        config.nats.subjects.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    shutdown.spawn(Arc::clone(&hub).relay_gaps(reconnects));
    let audit = config.audit.enabled.then(|| Audit {
        js: async_nats::jetstream::new(client.clone()),
        subject: config.nats.subjects.audit(),
    });
    if let Some(audit) = &audit {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        readiness.add("audit", move || flag.load(Ordering::Relaxed));
        let (js, subjects, limits) = (audit.js.clone(), config.nats.subjects.clone(), config.audit);
        let token = shutdown.token.clone();
        shutdown.spawn(async move {
            if ensure_audit_stream(&js, &subjects, &limits, token.cancelled())
                .await
                .is_ok()
            {
                ready.store(true, Ordering::Relaxed);
            }
        });
    }
    let uplink = Uplink::new(
        client.clone(),
        config.nats.subjects.notify(),
        config.notify_timeout,
        audit,
    );
    let gw = Arc::new(Gateway {
        config,
        hub,
        uplink,
        metrics,
        shutdown: shutdown.clone(),
        next_id: AtomicU64::new(0),
        instance: rand::random(),
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
    client.flush().await.context("flushing NATS")?;
    Ok(())
}
