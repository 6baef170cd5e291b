//! The LISTEN leader: one bridge at a time turns PostgreSQL notifications into NATS messages.
//!
//! Every bridge keeps a dedicated connection that tries `pg_try_advisory_lock(key)` (the key
//! derives from the NATS prefix) every second. The holder runs `LISTEN` on the listen channel
//! and publishes each notification's payload, verbatim, to the delivery subject of the
//! payload's `channel` field. PostgreSQL releases the lock when that session ends, so
//! leadership moves to a standby within about a second of the leader's death; the old leader
//! stops publishing the moment its connection ends, since it only publishes what that
//! connection delivers. Notifications sent while no bridge listens are lost, as in
//! postgres-websockets. So that clients can resync, the new leader publishes a gap marker
//! (`<prefix>.gap`, body `listener`) each time it starts listening; gateways pass it on to the
//! sockets that asked for gap signals.
//!
//! Bounds: one notification is published at a time; when NATS pushes back, reading stops and
//! PostgreSQL's own NOTIFY queue absorbs the burst (its fill level is the
//! `bridge_notification_queue_usage` gauge). At most one probe query is in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client as Nats, HeaderMap};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use pgws_config::DbConfig;
use pgws_proto::{headers, Envelope, Subjects};
use pgws_service::telemetry::{self, TARGET as TRACE};
use tokio::time::{interval_at, sleep, timeout, Instant, Interval, MissedTickBehavior};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, Notification};
use tokio_util::sync::CancellationToken;

use crate::db::{self, quote_ident, PgConnection};
use crate::metrics::BridgeMetrics;

/// The reason of the gap marker published when a bridge (re)gains LISTEN.
pub(crate) const GAP_LISTENER: &str = "listener";
/// How often a standby tries to take the lock.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// How often the leader samples `pg_notification_queue_usage()` (also its timeout).
const USAGE_INTERVAL: Duration = Duration::from_secs(5);
/// Time a closing session has to say goodbye, so PostgreSQL releases the lock at once.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness and the metrics see of the listener.
#[derive(Debug, Default)]
pub(crate) struct ListenerState {
    leader: AtomicBool,
    connected: AtomicBool,
}

impl ListenerState {
    /// Ready unless this bridge is the leader without its LISTEN connection.
    pub(crate) fn ready(&self) -> bool {
        !self.leader.load(Ordering::Acquire) || self.connected.load(Ordering::Acquire)
    }
}

/// How a session ended.
#[derive(Debug)]
enum End {
    Shutdown,
    Lost(String),
}

/// The listener's settings and handles; [`Listener::run`] is its task.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) pg: Config,
    pub(crate) channel: String,
    pub(crate) check_interval: Option<Duration>,
    pub(crate) subjects: Subjects,
    pub(crate) nats: Nats,
    pub(crate) metrics: BridgeMetrics,
    pub(crate) state: Arc<ListenerState>,
}

impl Listener {
    /// Runs sessions on `first`, then on new connections (1 s doubling up to 32 s between
    /// attempts, forever), until `token` is cancelled.
    pub(crate) async fn run(self, first: (Client, PgConnection), token: CancellationToken) {
        let mut next = Some(first);
        let mut attempt = 0;
        loop {
            let (client, connection) = match next.take() {
                Some(pair) => pair,
                None => {
                    let result = tokio::select! {
                        _ = token.cancelled() => return,
                        r = db::connect(&self.pg) => r,
                    };
                    match result {
                        Ok(pair) => {
                            self.metrics.listener_reconnects.inc();
                            tracing::info!("listen connection re-established");
                            attempt = 0;
                            pair
                        }
                        Err(e) => {
                            tracing::warn!(attempt, error = %e, "listen connection failed");
                            if !pause(&token, DbConfig::backoff(attempt)).await {
                                return;
                            }
                            attempt += 1;
                            continue;
                        }
                    }
                }
            };
            self.set_connected(true);
            let end = self.session(client, connection, &token).await;
            self.set_leader(false);
            self.set_connected(false);
            match end {
                End::Shutdown => {
                    tracing::info!("listener stopped");
                    return;
                }
                End::Lost(reason) => {
                    tracing::warn!(reason, "listen connection lost");
                    if !pause(&token, DbConfig::backoff(attempt)).await {
                        return;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One connection's life: standby, then leader; closed cleanly at shutdown.
    async fn session(
        &self,
        client: Client,
        mut connection: PgConnection,
        token: &CancellationToken,
    ) -> End {
        let client = Arc::new(client);
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let end = self.lead(&client, &mut messages, token).await;
        drop(client);
        if matches!(end, End::Shutdown) {
            // The last client is gone: the connection says goodbye and ends the stream.
            let goodbye = async { while messages.next().await.is_some() {} };
            let _ = timeout(CLOSE_TIMEOUT, goodbye).await;
        }
        end
    }

    async fn lead<S>(
        &self,
        client: &Arc<Client>,
        messages: &mut S,
        token: &CancellationToken,
    ) -> End
    where
        S: Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin,
    {
        let key = self.subjects.leader_lock_key();
        let mut told = false;
        loop {
            let params: [&(dyn ToSql + Sync); 1] = [&key];
            let lock = client.query_one("SELECT pg_try_advisory_lock($1)", &params);
            match drive(messages, token, lock).await {
                Ok(Ok(row)) => match row.try_get::<_, bool>(0) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => return End::Lost(e.to_string()),
                },
                Ok(Err(e)) => return End::Lost(e.to_string()),
                Err(end) => return end,
            }
            if !told {
                tracing::info!("standby: another bridge is the leader");
                told = true;
            }
            if let Err(end) = drive(messages, token, sleep(STANDBY_RETRY)).await {
                return end;
            }
        }
        let listen = format!("LISTEN {}", quote_ident(&self.channel));
        match drive(messages, token, client.batch_execute(&listen)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return End::Lost(e.to_string()),
            Err(end) => return end,
        }
        self.set_leader(true);
        tracing::info!(channel = %self.channel, "leader");
        tracing::info!(channel = %self.channel, "listening");
        if let Err(e) = self
            .nats
            .publish(
                self.subjects.gap(),
                Bytes::from_static(GAP_LISTENER.as_bytes()),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot publish the gap marker");
        }

        let mut usage = interval_at(Instant::now(), USAGE_INTERVAL);
        usage.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut check = self.check_interval.map(|period| {
            let mut i = interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        let mut probe: Option<Probe> = None;
        // When the connection last delivered something: a probe that times out while
        // notifications keep arriving (its answer queued behind them) proves nothing.
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return End::Shutdown,
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        heard = Instant::now();
                        self.publish(&n).await;
                    }
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        tracing::debug!(message = n.message(), "listen connection notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Lost(e.to_string()),
                    None => return End::Lost("connection closed".to_owned()),
                },
                outcome = in_flight(&mut probe), if probe.is_some() => {
                    probe = None;
                    match outcome {
                        Outcome::Alive => {}
                        Outcome::Dead(reason) => return End::Lost(format!("listener check failed: {reason}")),
                        Outcome::Silent(period) if heard.elapsed() < period => {
                            tracing::debug!("listener check unanswered while notifications arrive");
                        }
                        Outcome::Silent(period) => {
                            return End::Lost(format!("listener check failed: no answer within {period:?}"));
                        }
                        Outcome::Usage(Ok(level)) => {
                            self.metrics.queue_usage.set(level);
                        }
                        Outcome::Usage(Err(e)) => {
                            tracing::warn!(error = e, "cannot read the notification queue usage");
                        }
                    }
                },
                _ = usage.tick(), if probe.is_none() => probe = Some(usage_probe(client.clone())),
                _ = tick(&mut check), if probe.is_none() => {
                    let period = self.check_interval.unwrap_or(USAGE_INTERVAL);
                    probe = Some(check_probe(client.clone(), period));
                },
            }
        }
    }

    async fn publish(&self, n: &Notification) {
        if n.channel() != self.channel {
            return;
        }
        match Envelope::route(n.payload()) {
            Ok(channel) => {
                // One trace per notification: received here, published to the gateways.
                let span = tracing::info_span!(
                    target: TRACE,
                    "bridge.listen",
                    otel.kind = "consumer",
                    messaging.system = "postgresql",
                    messaging.destination.name = %channel,
                    messaging.message.body.size = n.payload().len(),
                    otel.status_code = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                telemetry::mark(&span);
                let subject = self.subjects.deliver(&channel);
                let mut h = HeaderMap::new();
                h.insert(headers::LISTENED_AT, headers::listened_now().as_str());
                let publish = tracing::info_span!(
                    target: TRACE,
                    parent: &span,
                    "bridge.publish",
                    otel.kind = "producer",
                    messaging.system = "nats",
                    messaging.destination.name = %subject,
                    otel.status_code = tracing::field::Empty,
                );
                telemetry::inject(&publish, &mut h);
                let payload = Bytes::copy_from_slice(n.payload().as_bytes());
                match self.nats.publish_with_headers(subject, h, payload).await {
                    Ok(()) => {
                        self.metrics.published.inc();
                    }
                    Err(e) => {
                        publish.record("otel.status_code", "ERROR");
                        span.record("otel.status_code", "ERROR");
                        span.in_scope(|| {
                            tracing::warn!(channel, error = %e, "cannot publish a notification");
                        });
                    }
                }
            }
            Err(e) => {
                self.metrics.unroutable.inc();
                tracing::debug!(error = %e, "unroutable notification ignored");
            }
        }
    }

    fn set_leader(&self, on: bool) {
        self.state.leader.store(on, Ordering::Release);
        self.metrics.leader.set(i64::from(on));
        if !on {
            // Only the leader samples the queue; a stale value would mislead a max() query.
            self.metrics.queue_usage.set(0.0);
        }
    }

    fn set_connected(&self, on: bool) {
        self.state.connected.store(on, Ordering::Release);
        self.metrics.listener_connected.set(i64::from(on));
    }
}

/// Waits `delay` unless shutdown comes first (then false).
async fn pause(token: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = sleep(delay) => true,
    }
}

/// Awaits `work` while driving the connection; `Err` when the connection ends or shutdown
/// comes first.
async fn drive<S, F>(messages: &mut S, token: &CancellationToken, work: F) -> Result<F::Output, End>
where
    S: Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin,
    F: Future,
{
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return Err(End::Shutdown),
            out = &mut work => return Ok(out),
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(End::Lost(e.to_string())),
                None => return Err(End::Lost("connection closed".to_owned())),
            },
        }
    }
}

/// What a probe found.
enum Outcome {
    Alive,
    Dead(String),
    /// No answer within the period (the connection may only be busy delivering).
    Silent(Duration),
    Usage(Result<f64, String>),
}

type Probe = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// `SELECT 1` with the check interval as its timeout (`PGWS_CHECK_LISTENER_INTERVAL`).
fn check_probe(client: Arc<Client>, period: Duration) -> Probe {
    Box::pin(async move {
        match timeout(period, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Outcome::Alive,
            Ok(Err(e)) => Outcome::Dead(e.to_string()),
            Err(_) => Outcome::Silent(period),
        }
    })
}

fn usage_probe(client: Arc<Client>) -> Probe {
    Box::pin(async move {
        let query = client.query_one("SELECT pg_notification_queue_usage()", &[]);
        Outcome::Usage(match timeout(USAGE_INTERVAL, query).await {
            Ok(Ok(row)) => row.try_get::<_, f64>(0).map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {USAGE_INTERVAL:?}")),
        })
    })
}

async fn in_flight(probe: &mut Option<Probe>) -> Outcome {
    match probe {
        Some(p) => p.await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
