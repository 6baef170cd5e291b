//! Local channel membership and fan-out.
//!
//! One NATS subscription per channel that has local readers. A notification is turned into a
//! websocket message once and that message (a reference-counted buffer) is queued to every
//! socket on the channel. Each socket's queue is bounded: a socket whose queue is full is a
//! slow consumer and is disconnected (counted), so a reader that stops reading never grows the
//! gateway's memory past that bound.
//!
//! Gap signals: sockets whose token asks for them (claim `"gaps": true`) get
//! `{"event":"Gap","reason":"..."}` when database -> socket delivery may have been interrupted:
//! a bridge (re)gained LISTEN (`<prefix>.gap`, reason `listener`), or this gateway's NATS
//! connection came back (reason `nats`). Everyone else sees nothing new.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures::StreamExt;
use pgws_proto::{headers, Subjects};
use pgws_service::telemetry::{self, TARGET as TRACE};
use pgws_service::Shutdown;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;

/// How long a handshake waits for a new channel's subscription to reach NATS.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// A socket as the hub sees it: where to queue messages, and how to kick it.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) kick: CancellationToken,
}

struct Channel {
    subscribers: RwLock<HashMap<u64, Subscriber>>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
}

/// The channels with local readers.
pub(crate) struct Hub {
    client: async_nats::Client,
    subjects: Subjects,
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    /// Sockets that asked for gap signals.
    gap_watchers: RwLock<HashMap<u64, Subscriber>>,
    metrics: GatewayMetrics,
    shutdown: Shutdown,
}

impl Hub {
    pub(crate) fn new(
        client: async_nats::Client,
        subjects: Subjects,
        metrics: GatewayMetrics,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            subjects,
            channels: Mutex::new(HashMap::new()),
            gap_watchers: RwLock::new(HashMap::new()),
            metrics,
            shutdown,
        })
    }

    /// Adds socket `id` to `channel`, subscribing on NATS if it is the channel's first local
    /// reader; resolves once the subscription is known to the server (bounded wait), so that a
    /// socket receives everything notified after its handshake.
    pub(crate) async fn join(self: &Arc<Self>, channel: &str, id: u64, sub: Subscriber) {
        let state = {
            let Ok(mut channels) = self.channels.lock() else {
                return;
            };
            let state = channels
                .entry(channel.to_owned())
                .or_insert_with(|| self.open(channel))
                .clone();
            if let Ok(mut subs) = state.subscribers.write() {
                subs.insert(id, sub);
            }
            state
        };
        let mut ready = state.ready.subscribe();
        drop(tokio::time::timeout(SUBSCRIBE_WAIT, ready.wait_for(|r| *r)).await);
    }

    /// Socket `id` gets gap signals until [`Hub::unwatch_gaps`].
    pub(crate) fn watch_gaps(&self, id: u64, sub: Subscriber) {
        if let Ok(mut w) = self.gap_watchers.write() {
            w.insert(id, sub);
        }
    }

    pub(crate) fn unwatch_gaps(&self, id: u64) {
        if let Ok(mut w) = self.gap_watchers.write() {
            w.remove(&id);
        }
    }

    /// Queues `{"event":"Gap","reason":reason}` to every socket that asked for gap signals
    /// (a socket whose queue is full is a slow consumer, as for notifications).
    pub(crate) fn gap(&self, reason: &str) {
        let json = serde_json::json!({"event": "Gap", "reason": reason}).to_string();
        let message = Message::Text(Utf8Bytes::from(json));
        let mut sent = 0u64;
        if let Ok(watchers) = self.gap_watchers.read() {
            for sub in watchers.values() {
                match sub.tx.try_send(message.clone()) {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if !sub.kick.is_cancelled() {
                            self.metrics.slow_consumers.inc();
                            sub.kick.cancel();
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        tracing::info!(reason, sockets = sent, "gap signalled");
    }

    /// Forwards the bridges' gap markers, and signals a gap each time the NATS connection
    /// comes back; runs until shutdown.
    pub(crate) async fn relay_gaps(self: Arc<Self>, mut reconnects: watch::Receiver<u64>) {
        let mut markers = match self.client.subscribe(self.subjects.gap()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to gap markers");
                return;
            }
        };
        let token = self.shutdown.token.clone();
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                changed = reconnects.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.gap("nats");
                }
                marker = markers.next() => match marker {
                    Some(m) => {
                        let reason = String::from_utf8_lossy(&m.payload);
                        let reason: String = reason.chars().take(64).collect();
                        self.gap(&reason);
                    }
                    None => break,
                },
            }
        }
    }

    /// Removes socket `id` from `channel`; the last reader's departure ends the subscription.
    pub(crate) fn leave(&self, channel: &str, id: u64) {
        let Ok(mut channels) = self.channels.lock() else {
            return;
        };
        let Some(state) = channels.get(channel) else {
            return;
        };
        let empty = match state.subscribers.write() {
            Ok(mut subs) => {
                subs.remove(&id);
                subs.is_empty()
            }
            Err(_) => false,
        };
        if empty {
            state.stop.cancel();
            channels.remove(channel);
            self.metrics.channels.dec();
        }
    }

    fn open(self: &Arc<Self>, channel: &str) -> Arc<Channel> {
        let (ready, _) = watch::channel(false);
        let state = Arc::new(Channel {
            subscribers: RwLock::new(HashMap::new()),
            ready,
            stop: self.shutdown.token.child_token(),
        });
        self.metrics.channels.inc();
        let hub = Arc::clone(self);
        let subject = self.subjects.deliver(channel);
        let pump_state = Arc::clone(&state);
        self.shutdown
            .spawn(async move { hub.pump(subject, pump_state).await });
        state
    }

    async fn pump(&self, subject: String, state: Arc<Channel>) {
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(subject, error = %e, "subscribe failed");
                return;
            }
        };
        // A round trip through the server: once it answers, the subscription is live there.
        if let Err(e) = self
            .client
            .request(self.subjects.sync_probe(), Bytes::new())
            .await
        {
            if e.kind() != async_nats::RequestErrorKind::NoResponders {
                tracing::warn!(subject, error = %e, "subscription not confirmed");
            }
        }
        state.ready.send_replace(true);
        loop {
            tokio::select! {
                _ = state.stop.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => self.fan_out(&state, msg),
                    None => break,
                },
            }
        }
        drop(sub.unsubscribe().await);
    }

    /// Queues one notification to every local reader of its channel: one span for the
    /// notification (not one per socket), one shared buffer.
    fn fan_out(&self, state: &Channel, msg: async_nats::Message) {
        self.metrics.notifications_in.inc();
        let listened_at = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::LISTENED_AT))
            .map(|v| v.as_str());
        let span = tracing::info_span!(
            target: TRACE,
            "gateway.fanout",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.destination.name = %msg.subject,
            messaging.message.body.size = msg.payload.len(),
            sockets = tracing::field::Empty,
            slow_consumers = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::adopt(&span, msg.headers.as_ref());
        let _entered = span.enter();
        let payload = msg.payload;
        let len = payload.len() as u64;
        let Ok(text) = Utf8Bytes::try_from(payload) else {
            tracing::warn!("notification is not UTF-8; dropped");
            return;
        };
        let message = Message::Text(text);
        let mut delivered = 0u64;
        let mut slow = 0u64;
        if let Ok(subs) = state.subscribers.read() {
            for sub in subs.values() {
                match sub.tx.try_send(message.clone()) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if !sub.kick.is_cancelled() {
                            slow += 1;
                            sub.kick.cancel();
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        if let Some(age) = listened_at.and_then(headers::since_listened) {
            self.metrics.delivery_latency.observe(age.as_secs_f64());
        }
        span.record("sockets", delivered);
        span.record("slow_consumers", slow);
        tracing::debug!(sockets = delivered, slow, "notification fanned out");
        self.metrics.slow_consumers.inc_by(slow);
        self.metrics.deliveries.inc_by(delivered);
        self.metrics.bytes_out.inc_by(delivered * len);
    }
}
