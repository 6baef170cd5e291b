//! The leader's duty: turn PostgreSQL notifications into bus messages, LISTENing on a set of
//! channels that changes at run time, and keep the stack's registry.
//!
//! - `PGWS_LISTEN_CHANNEL` (postgres-websockets): each notification's payload is published,
//!   verbatim, to the delivery subject of the payload's `channel` field.
//! - Direct channels (postgrest-ws): the gateways report the ones their sockets read
//!   ([`crate::registry`]); the leader LISTENs on each while some gateway needs it, UNLISTENs
//!   after, and publishes each notification's payload verbatim to `<prefix>.direct.<channel>`.
//!   A report is answered once its channels are LISTENed, so a socket's handshake completes
//!   only when what is notified after it will reach it.
//! - wspubsub topics: claims, releases and lookups are answered from the registry; an orphan
//!   topic whose grace period ended gets a close message on its subject.
//!
//! Notifications sent while no bridge listens are lost, as in postgres-websockets. So that
//! clients can resync, the leader publishes a gap marker (`<prefix>.gap`, body `listener`) each
//! time it starts listening; gateways pass it on to the sockets that asked for gap signals,
//! and report their state again at once, which rebuilds the registry of a new leader.
//!
//! Bounds: one notification is published at a time; when the bus pushes back, reading stops and
//! PostgreSQL's own NOTIFY queue absorbs the burst (its fill level is the
//! `bridge_notification_queue_usage` gauge). At most one probe query and one LISTEN/UNLISTEN
//! statement are in flight; registry requests wait in their bus subscription.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt as _;
use pgws_bus::{Client as Bus, Headers, Message};
use pgws_config::DirectChannels;
use pgws_proto::{
    headers, Envelope, LiveClass, RegistryOp, RegistryReply, RegistryRequest, Subjects, Topic,
};
use pgws_service::telemetry::{self, TARGET as TRACE};
use tokio::sync::watch;
use tokio::time::{interval_at, sleep_until, timeout, Instant, Interval, MissedTickBehavior};
use tokio_postgres::{AsyncMessage, Client, Notification};
use tokio_util::sync::CancellationToken;

use crate::bus::reply;
use crate::capture::Capture;
use crate::db::quote_ident;
use crate::leader::{drive, drive_keeping, Duty, End, Messages};
use crate::metrics::BridgeMetrics;
use crate::registry::{Changes, Registry};
use crate::standing;

/// The reason of the gap marker published when a bridge (re)gains LISTEN.
pub(crate) const GAP_LISTENER: &str = "listener";
/// How often the leader samples `pg_notification_queue_usage()` (also its timeout).
const USAGE_INTERVAL: Duration = Duration::from_secs(5);
/// The close frame of a wspubsub topic whose publisher did not come back in time.
pub(crate) const TOPIC_CLOSED: &str =
    "4004 topic closed: its publisher left and none took over within the grace period";

/// The leader's settings and handles.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) channel: String,
    pub(crate) check_interval: Option<Duration>,
    pub(crate) subjects: Subjects,
    pub(crate) bus: Bus,
    pub(crate) metrics: BridgeMetrics,
    /// How long an orphan wspubsub topic waits for a new publisher (`PGWS_PUBSUB_GRACE`).
    pub(crate) grace: Duration,
    /// The channels gateways may have LISTENed (`PGWS_DIRECT_CHANNELS`).
    pub(crate) direct: DirectChannels,
    /// How long a table class is still captured and a direct channel LISTENed after their
    /// last reader left: the history's age (`PGWS_HISTORY_SECONDS`), so a socket that resumes
    /// finds what it missed.
    pub(crate) linger: Duration,
    /// The `/live` table classes the registry knows, for the capture.
    pub(crate) classes: watch::Sender<Arc<Vec<LiveClass>>>,
    /// The change capture of `/live` table topics, when `PGWS_TABLE_TOPICS` names some.
    pub(crate) capture: Option<Arc<Capture>>,
    /// Set while this leader waits for the gateways' reports before answering topic
    /// questions (the bridge's readiness says so).
    pub(crate) settling: Arc<AtomicBool>,
}

/// Clears the settling flag when the leadership ends.
struct Settling<'a>(&'a AtomicBool);

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Duty for Listener {
    fn taking_lead(&self) {
        // Never ready as a leader before the registry knew whether it must wait.
        self.settling.store(true, Ordering::Release);
    }

    fn lead<'a>(
        &'a self,
        client: &'a Arc<Client>,
        messages: &'a mut Messages,
        token: &'a CancellationToken,
    ) -> BoxFuture<'a, End> {
        Box::pin(async move {
            self.classes.send_replace(Arc::default());
            let Some(capture) = &self.capture else {
                return self.listen(client, messages, token).await;
            };
            // The capture lives exactly as long as the leadership, in a task of its own: a
            // batch being decoded and published does not hold up notifications.
            let (capture, classes, until) =
                (Arc::clone(capture), self.classes.subscribe(), token.clone());
            let _capturing = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                let never = capture.run(classes, &until).await;
                match never {}
            }));
            self.listen(client, messages, token).await
        })
    }
}

/// LISTEN/UNLISTEN statements waiting to run, and the registry requests answered once they
/// ran.
#[derive(Default)]
struct Queued {
    sql: Vec<String>,
    replies: Vec<String>,
    /// Whether `pgws_bridge.registry` says this stack holds topics, once written by the
    /// statements queued; `None` when the flag is not kept ([`crate::standing`]).
    kept: Option<bool>,
}

type Statement = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

impl Listener {
    async fn listen(
        &self,
        client: &Arc<Client>,
        messages: &mut Messages,
        token: &CancellationToken,
    ) -> End {
        // Not ready to answer topic questions until the registry knows what it must.
        self.settling.store(true, Ordering::Release);
        let _settling = Settling(&self.settling);
        let mut requests = match drive(
            messages,
            token,
            self.bus.subscribe(self.subjects.registry()),
        )
        .await
        {
            Ok(Ok(sub)) => sub,
            Ok(Err(e)) => return End::Lost(format!("cannot serve the registry: {e}")),
            Err(end) => return end,
        };
        let listen = format!("LISTEN {}", quote_ident(&self.channel));
        match drive(messages, token, client.batch_execute(&listen)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return End::Lost(e.to_string()),
            Err(end) => return end,
        }
        // Whether an earlier leader knew topics, read while the notifications that arrive
        // meanwhile are kept, to be published first.
        let key = self.subjects.leader_lock_key();
        let mut early = Vec::new();
        let read = standing::read(client, key);
        let kept = match drive_keeping(messages, token, read, &mut early).await {
            Ok(Ok(held)) => Some(held),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, table = standing::TABLE, "cannot keep whether the stack holds topics: this leader waits for the gateways' reports before answering topic questions");
                None
            }
            Err(end) => return end,
        };
        tracing::info!(channel = %self.channel, "listening");
        if let Err(e) = self
            .bus
            .publish(
                self.subjects.gap(),
                Bytes::from_static(GAP_LISTENER.as_bytes()),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot publish the gap marker");
        }
        let mut registry =
            Registry::new(self.grace, self.direct.clone(), Instant::now()).with_linger(self.linger);
        if kept == Some(false) {
            // No earlier leader knew of a topic: there is nothing to wait for.
            registry.settle_now(Instant::now());
        }
        for n in &early {
            self.publish(n, &registry).await;
        }
        let mut queued = Queued {
            kept,
            ..Queued::default()
        };
        let mut statement: Option<(Statement, Vec<String>)> = None;

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
            if statement.is_none() {
                if !queued.sql.is_empty() {
                    let sql = std::mem::take(&mut queued.sql).join("; ");
                    let c = Arc::clone(client);
                    let run: Statement = Box::pin(async move { c.batch_execute(&sql).await });
                    statement = Some((run, std::mem::take(&mut queued.replies)));
                } else {
                    for to in queued.replies.drain(..) {
                        reply(&self.bus, Some(&to), &RegistryReply::Ok).await;
                    }
                }
            }
            let deadline = registry.next_deadline();
            let settled_at = registry.settled_at();
            let settling = Instant::now() < settled_at;
            self.settling.store(settling, Ordering::Release);
            tokio::select! {
                biased;
                _ = token.cancelled() => return End::Shutdown,
                _ = sleep_until(settled_at), if settling => {}
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        heard = Instant::now();
                        self.publish(&n, &registry).await;
                    }
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        tracing::debug!(message = n.message(), "listen connection notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Lost(e.to_string()),
                    None => return End::Lost("connection closed".to_owned()),
                },
                done = ran(&mut statement), if statement.is_some() => {
                    let waiting = statement.take().map(|(_, w)| w).unwrap_or_default();
                    if let Err(e) = done {
                        return End::Lost(format!("LISTEN failed: {e}"));
                    }
                    self.metrics.direct_channels.set(registry.channels().count() as i64);
                    for to in waiting {
                        reply(&self.bus, Some(&to), &RegistryReply::Ok).await;
                    }
                },
                request = requests.next() => match request {
                    Some(m) => self.serve(m, &mut registry, &mut queued).await,
                    None => return End::Lost("the registry subscription ended".to_owned()),
                },
                _ = wake(deadline), if deadline.is_some() => {
                    let changes = registry.expire(Instant::now());
                    self.share_classes(&registry);
                    self.apply(changes, &mut queued).await;
                    self.keep(&registry, &mut queued);
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

    /// Answers one registry request; a report waits for its LISTENs.
    async fn serve(&self, m: Message, registry: &mut Registry, queued: &mut Queued) {
        let request: RegistryRequest = match serde_json::from_slice(&m.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "invalid registry request ignored");
                return;
            }
        };
        let now = Instant::now();
        let answer = match request.op {
            RegistryOp::Alive { version } => {
                if registry.alive(&request.gateway, version, now) {
                    RegistryReply::Ok
                } else {
                    RegistryReply::Unknown
                }
            }
            RegistryOp::Change {
                base,
                version,
                added,
                removed,
            } => {
                let Some(changes) =
                    registry.change(&request.gateway, (base, version), added, &removed, now)
                else {
                    reply(&self.bus, m.reply.as_ref(), &RegistryReply::Unknown).await;
                    return;
                };
                self.registry_changed(&request.gateway, changes, registry, queued, m.reply)
                    .await;
                return;
            }
            RegistryOp::Report {
                presence,
                part,
                version,
            } => {
                let changes = match part {
                    None => registry.report_version(&request.gateway, presence, version, now),
                    Some(part) => {
                        match registry.report_part(&request.gateway, part, presence, version, now) {
                            Ok(Some(changes)) => changes,
                            Ok(None) => {
                                reply(&self.bus, m.reply.as_ref(), &RegistryReply::Ok).await;
                                return;
                            }
                            Err(why) => {
                                tracing::warn!(gateway = %request.gateway, why, "a presence report in parts was dropped; the gateway sends it again");
                                reply(&self.bus, m.reply.as_ref(), &RegistryReply::Retry).await;
                                return;
                            }
                        }
                    }
                };
                self.registry_changed(&request.gateway, changes, registry, queued, m.reply)
                    .await;
                return;
            }
            RegistryOp::Claim { topic } => {
                let answer = registry.claim(&request.gateway, topic, now);
                if self.keep(registry, queued) {
                    // The first topic: granted once the flag says so.
                    if let Some(to) = m.reply {
                        queued.replies.push(to);
                    }
                    return;
                }
                answer
            }
            RegistryOp::Release { topic } => registry.release(&request.gateway, &topic, now),
            RegistryOp::Lookup { topic } => registry.lookup(&topic, now),
        };
        reply(&self.bus, m.reply.as_ref(), &answer).await;
    }

    /// What a gateway's report or change leads to: warnings for the direct channels refused,
    /// the classes handed to the capture, the LISTENs queued, the topics flag kept; the
    /// gateway is answered (`reply`) once the queued statements ran.
    async fn registry_changed(
        &self,
        gateway: &str,
        changes: Changes,
        registry: &Registry,
        queued: &mut Queued,
        reply: Option<String>,
    ) {
        for channel in &changes.refused {
            tracing::warn!(
                gateway,
                channel,
                "a gateway reported a direct channel that is not in PGWS_DIRECT_CHANNELS here: not listening on it"
            );
            self.metrics.direct_refused.inc();
        }
        self.share_classes(registry);
        self.apply(changes, queued).await;
        self.keep(registry, queued);
        queued.replies.extend(reply);
    }

    /// Queues the write of whether the registry holds topics, when that changed; true when
    /// it did (a granted claim is then answered once the flag is written).
    fn keep(&self, registry: &Registry, queued: &mut Queued) -> bool {
        let now = registry.has_topics();
        if !now && Instant::now() < registry.settled_at() {
            // Not known yet: the gateways may still report topics.
            return false;
        }
        match queued.kept {
            Some(kept) if kept != now => {
                let key = self.subjects.leader_lock_key();
                queued.sql.push(standing::write(key, now));
                queued.kept = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Hands the registry's table classes to the capture, when they changed.
    fn share_classes(&self, registry: &Registry) {
        let classes = registry.classes();
        self.classes.send_if_modified(|shared| {
            if **shared == classes {
                return false;
            }
            *shared = Arc::new(classes);
            true
        });
    }

    /// Queues the LISTEN/UNLISTEN statements of `changes` and closes ended topics.
    async fn apply(&self, changes: Changes, queued: &mut Queued) {
        // The listen channel is LISTENed for good; a direct channel of the same name (refused
        // by the gateways) must not UNLISTEN it.
        let own = |c: &String| *c != self.channel;
        for c in changes.listen.iter().filter(|c| own(c)) {
            tracing::debug!(channel = %c, "listen on a direct channel");
            queued.sql.push(format!("LISTEN {}", quote_ident(c)));
        }
        for c in changes.unlisten.iter().filter(|c| own(c)) {
            tracing::debug!(channel = %c, "unlisten a direct channel");
            queued.sql.push(format!("UNLISTEN {}", quote_ident(c)));
        }
        for topic in changes.closed {
            self.close_topic(&topic).await;
        }
    }

    async fn close_topic(&self, topic: &Topic) {
        tracing::info!(domain = %topic.domain, topic = %topic.topic, "topic closed: no publisher within the grace period");
        let mut h = Headers::new();
        h.insert(headers::CLOSE.to_owned(), TOPIC_CLOSED.to_owned());
        if let Err(e) = self
            .bus
            .publish_with_headers(self.subjects.topic_close(topic), h, Bytes::new())
            .await
        {
            tracing::warn!(error = %e, "cannot close a topic");
        }
    }

    /// Publishes a notification: by its envelope's `channel` on the listen channel, verbatim
    /// on a direct channel.
    async fn publish(&self, n: &Notification, registry: &Registry) {
        let (subject, channel) = if n.channel() == self.channel {
            match Envelope::route(n.payload()) {
                Ok(channel) => (self.subjects.deliver(&channel), channel),
                Err(e) => {
                    self.metrics.unroutable.inc();
                    tracing::debug!(error = %e, "unroutable notification ignored");
                    return;
                }
            }
        } else if registry.is_listened(n.channel()) {
            (self.subjects.direct(n.channel()), n.channel().to_owned())
        } else {
            // UNLISTENed meanwhile: nobody reads it any more.
            return;
        };
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
        let mut h = Headers::new();
        h.insert(headers::LISTENED_AT.to_owned(), headers::listened_now());
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
        match self.bus.publish_with_headers(subject, h, payload).await {
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
}

async fn ran(
    statement: &mut Option<(Statement, Vec<String>)>,
) -> Result<(), tokio_postgres::Error> {
    match statement {
        Some((run, _)) => run.await,
        None => std::future::pending().await,
    }
}

async fn wake(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
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
            Ok(Err(e)) => Outcome::Dead(match e.as_db_error() {
                Some(db) => format!("{e}: {}", db.message()),
                None => e.to_string(),
            }),
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
