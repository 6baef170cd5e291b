//! Local subscriptions and fan-out, for every protocol.
//!
//! Sockets read subjects (a postgres-websockets channel's delivery subject, a direct channel's,
//! a wspubsub topic's). One NATS subscription per subject that has local readers. A message is
//! turned into a websocket frame once (text, or binary when the `Pgws-Frame: binary` header
//! says so) and that frame (a reference-counted buffer) is queued to every socket on the
//! subject. Each socket's queue is bounded: a socket whose queue is full is a slow consumer and
//! is disconnected (counted), so a reader that stops reading never grows the gateway's memory
//! past that bound. The leader bridge closes a wspubsub topic's sockets with a message on the
//! topic's close subject (`<prefix>.topicclose.<domain>.<topic>`, which only bridges may
//! publish), its `Pgws-Close` header giving the close frame; the same header on a data subject
//! (which a publisher's gateway writes) is ignored, and that message dropped.
//!
//! Resuming sockets (`?resume`, `resume.rs`) read a subject through the history instead: one
//! tail of the history per subject with such readers (its own entry here, [`resume_key`]),
//! each message framed once with its position, and each socket's [`Hold`] keeping what comes
//! while its replay runs.
//!
//! Gap signals: sockets whose token asks for them (claim `"gaps": true`) get
//! `{"event":"Gap","reason":"..."}` when database -> socket delivery may have been interrupted:
//! a bridge (re)gained LISTEN (`<prefix>.gap`, reason `listener`), or this gateway's NATS
//! connection came back (reason `nats`). Everyone else sees nothing new.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures::StreamExt;
use pgws_proto::{headers, Subjects};
use pgws_service::prometheus_client::metrics::gauge::Gauge;
use pgws_service::telemetry::{self, TARGET as TRACE};
use pgws_service::Shutdown;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::queue;
use crate::resume::{Hold, Wrap};

/// The close code used when a `Pgws-Close` header carries no valid code.
const CLOSE_GOING_AWAY: u16 = 1001;

/// How long a handshake waits for a new subject's subscription to reach NATS.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// How long a resuming socket waits for its subject's history tail (a JetStream consumer,
/// slower to make than a subscription under load).
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// Close code of a slow consumer.
const CLOSE_POLICY: u16 = 1008;

/// Close code of a resuming socket whose history tail ended: come again (RFC 6455 1012,
/// service restart).
pub(crate) const CLOSE_RESTART: u16 = 1012;

/// The bytes a frame counts for.
fn message_len(message: &Message) -> usize {
    match message {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// How a socket is told to close, from outside its task: a close frame to send, or (cancelled
/// without one) shutdown.
#[derive(Debug, Clone)]
pub(crate) struct Kick {
    token: CancellationToken,
    why: Arc<OnceLock<(u16, String)>>,
}

impl Kick {
    /// A kick that shutdown also triggers.
    pub(crate) fn new(shutdown: &CancellationToken) -> Self {
        Self {
            token: shutdown.child_token(),
            why: Arc::default(),
        }
    }

    /// Closes the socket with `code` and `reason` (the first reason given wins).
    pub(crate) fn close(&self, code: u16, reason: impl Into<String>) {
        let _ = self.why.set((code, reason.into()));
        self.token.cancel();
    }

    pub(crate) fn is_kicked(&self) -> bool {
        self.token.is_cancelled()
    }

    pub(crate) async fn kicked(&self) {
        self.token.cancelled().await;
    }

    /// The close frame asked for; `None` after a kick means shutdown.
    pub(crate) fn reason(&self) -> Option<&(u16, String)> {
        self.why.get()
    }
}

/// Bytes queued to sockets and not yet written: each socket's own, and the gateway's total.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    /// `PGWS_SEND_BUDGET`: all sockets together.
    max: usize,
    /// `PGWS_SEND_QUEUE_BYTES`: one socket.
    per_socket: usize,
    gauge: Gauge,
}

impl Budget {
    pub(crate) fn new(max: usize, per_socket: usize, gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
            per_socket,
            gauge,
        })
    }
}

/// A message in a socket's queue; its bytes are counted until it is written or dropped.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) message: Message,
    ticket: Ticket,
}

impl Queued {
    /// The message, its bytes counted in `written` from now on (released with it).
    pub(crate) fn into_message(self, written: &mut Option<Written>) -> Message {
        match written {
            Some(w) => w.0.absorb(self.ticket),
            None => *written = Some(Written(self.ticket)),
        }
        self.message
    }
}

/// The bytes of a burst of messages handed to a socket, released together when it is dropped:
/// one update of the socket's count and of the gateway's for the burst, not one per message
/// (the gateway's count is shared by every socket and every core).
#[derive(Debug)]
pub(crate) struct Written(Ticket);

/// One socket's queued bytes, and the gateway's budget they also count against.
#[derive(Debug)]
pub(crate) struct SocketBytes {
    queued: AtomicUsize,
    budget: Arc<Budget>,
}

impl SocketBytes {
    pub(crate) fn new(budget: &Arc<Budget>) -> Arc<Self> {
        Arc::new(Self {
            queued: AtomicUsize::new(0),
            budget: Arc::clone(budget),
        })
    }
}

/// `len` bytes counted for a socket (its own `Arc`: no reference count shared between
/// sockets) and for the gateway.
#[derive(Debug)]
struct Ticket {
    len: usize,
    bytes: Arc<SocketBytes>,
}

impl Ticket {
    /// Counts `len` bytes; returns the ticket, the socket's total and the gateway's.
    fn take(len: usize, bytes: &Arc<SocketBytes>) -> (Self, usize, usize) {
        let mine = bytes.queued.fetch_add(len, Ordering::Relaxed) + len;
        let all = bytes.budget.used.fetch_add(len, Ordering::Relaxed) + len;
        let ticket = Self {
            len,
            bytes: Arc::clone(bytes),
        };
        (ticket, mine, all)
    }

    /// Takes over `other`'s bytes, so that they are released with this ticket's.
    fn absorb(&mut self, mut other: Ticket) {
        self.len += std::mem::take(&mut other.len);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        self.bytes.queued.fetch_sub(self.len, Ordering::Relaxed);
        self.bytes
            .budget
            .used
            .fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl Budget {
    /// Publishes the bytes queued now to the gauge (once per fan-out, not per socket).
    fn sample(&self) {
        let used = i64::try_from(self.used.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        self.gauge.set(used);
    }
}

/// Why a socket's queue refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Its own queue is full (`PGWS_SEND_QUEUE` messages or `PGWS_SEND_QUEUE_BYTES`).
    Slow,
    /// The gateway's budget is spent and this socket has a backlog of its own.
    Budget,
}

/// A socket as the hub sees it: where to queue messages, and how to kick it.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) tx: queue::Sender<Queued>,
    pub(crate) kick: Kick,
    /// Bytes queued for this socket.
    pub(crate) bytes: Arc<SocketBytes>,
    /// On a resume subject: what comes while the socket's replay runs, held back.
    pub(crate) hold: Option<Arc<Hold>>,
}

impl Subscriber {
    /// Whether the socket has at least half of its queue (messages or bytes) waiting: a
    /// replay waits for room rather than filling it.
    pub(crate) fn busy(&self) -> bool {
        self.tx.len() * 2 >= self.tx.capacity()
            || self.bytes.queued.load(Ordering::Relaxed) * 2 >= self.bytes.budget.per_socket
    }

    /// Queues `message`. At a limit the socket is disconnected: its queue full (messages or
    /// bytes: a slow consumer), or the gateway's budget spent while this socket has a backlog
    /// (a socket with an empty queue always gets its message). True when queued; `slow` and
    /// `spent` count the sockets newly kicked for each reason.
    pub(crate) fn offer(&self, message: Message, slow: &mut u64, spent: &mut u64) -> bool {
        let len = message_len(&message);
        let (ticket, mine, all) = Ticket::take(len, &self.bytes);
        let budget = &self.bytes.budget;
        let refused = if mine > budget.per_socket && mine > len {
            Some(Refused::Slow)
        } else if all > budget.max && mine > len {
            Some(Refused::Budget)
        } else {
            match self.tx.try_send(Queued { message, ticket }) {
                Ok(()) => return true,
                Err(queue::TrySendError::Full(_)) => Some(Refused::Slow),
                Err(queue::TrySendError::Closed(_)) => None,
            }
        };
        if let Some(why) = refused {
            if !self.kick.is_kicked() {
                match why {
                    Refused::Slow => {
                        *slow += 1;
                        self.kick
                            .close(CLOSE_POLICY, "slow consumer: send queue full");
                    }
                    Refused::Budget => {
                        *spent += 1;
                        self.kick
                            .close(CLOSE_POLICY, "server busy: send budget exhausted");
                    }
                }
            }
        }
        false
    }
}

struct Channel {
    subscribers: RwLock<HashMap<u64, Subscriber>>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
    /// The position of the last table event passed on (`/live` table topics): a leader
    /// bridge that took over publishes again what may have been published already.
    last_change: Mutex<Option<(u64, u64)>>,
}

/// The hub's entry of `subject` for sockets that read it through the history (framed as
/// `wrap`): a key no NATS subject can be (`#`).
pub(crate) fn resume_key(subject: &str, wrap: Wrap) -> String {
    format!("{subject}#{}", wrap.name())
}

impl Channel {
    /// Closes every local socket of the subject with `code` and `reason`.
    fn close_all(&self, code: u16, reason: &str) {
        if let Ok(subs) = self.subscribers.read() {
            for sub in subs.values() {
                sub.kick.close(code, reason);
            }
        }
    }
}

/// The subjects with local readers.
pub(crate) struct Hub {
    client: pgws_bus::Client,
    /// Where resuming sockets are served from (none: `?resume` is refused).
    pub(crate) history: Option<Arc<dyn pgws_bus::History>>,
    subjects: Subjects,
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    /// Sockets that asked for gap signals.
    gap_watchers: RwLock<HashMap<u64, Subscriber>>,
    /// The bytes queued to sockets.
    pub(crate) budget: Arc<Budget>,
    metrics: GatewayMetrics,
    shutdown: Shutdown,
}

impl Hub {
    pub(crate) fn new(
        client: pgws_bus::Client,
        history: Option<Arc<dyn pgws_bus::History>>,
        subjects: Subjects,
        budget: Arc<Budget>,
        metrics: GatewayMetrics,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            history,
            subjects,
            channels: Mutex::new(HashMap::new()),
            gap_watchers: RwLock::new(HashMap::new()),
            budget,
            metrics,
            shutdown,
        })
    }

    /// Adds socket `id` to `subject`, subscribing on NATS if it is the subject's first local
    /// reader; resolves once the subscription is known to the server (bounded wait), so that a
    /// socket receives everything published after its handshake.
    pub(crate) async fn join(self: &Arc<Self>, subject: &str, id: u64, sub: Subscriber) {
        self.join_as(subject, None, id, sub).await;
    }

    /// Adds socket `id` to the history's tail of `subject` ([`resume_key`]), framed as `wrap`,
    /// opening the tail if it is the first such reader here; resolves once the tail runs. False
    /// when it did not within [`RESUME_WAIT`]: what is published meanwhile may never reach the
    /// socket, which must not go on as if it were reading.
    pub(crate) async fn join_resume(
        self: &Arc<Self>,
        subject: &str,
        wrap: Wrap,
        id: u64,
        sub: Subscriber,
    ) -> bool {
        self.join_as(subject, Some(wrap), id, sub).await
    }

    /// True once the entry reads its subject (at most [`SUBSCRIBE_WAIT`] for a NATS
    /// subscription, [`RESUME_WAIT`] for a history's tail).
    async fn join_as(
        self: &Arc<Self>,
        subject: &str,
        resume: Option<Wrap>,
        id: u64,
        sub: Subscriber,
    ) -> bool {
        let key = match resume {
            Some(wrap) => resume_key(subject, wrap),
            None => subject.to_owned(),
        };
        let state = {
            let Ok(mut channels) = self.channels.lock() else {
                return false;
            };
            let state = channels
                .entry(key)
                .or_insert_with(|| self.open(subject, resume))
                .clone();
            if let Ok(mut subs) = state.subscribers.write() {
                subs.insert(id, sub);
            }
            state
        };
        let mut ready = state.ready.subscribe();
        let wait = if resume.is_some() {
            RESUME_WAIT
        } else {
            SUBSCRIBE_WAIT
        };
        let waited = tokio::time::timeout(wait, ready.wait_for(|r| *r)).await;
        waited.is_ok_and(|r| r.is_ok())
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
        let (mut sent, mut slow, mut spent) = (0u64, 0u64, 0u64);
        if let Ok(watchers) = self.gap_watchers.read() {
            for sub in watchers.values() {
                sent += u64::from(sub.offer(message.clone(), &mut slow, &mut spent));
            }
        }
        self.metrics.slow_consumers.inc_by(slow);
        self.metrics.budget_disconnects.inc_by(spent);
        self.budget.sample();
        tracing::info!(reason, sockets = sent, "gap signalled");
    }

    /// Forwards the bridges' gap markers, and signals a gap each time the NATS connection
    /// comes back; each is also a reason to report this gateway's state to the leader again
    /// (`resync`). Runs until shutdown.
    pub(crate) async fn relay_gaps(
        self: Arc<Self>,
        mut reconnects: watch::Receiver<u64>,
        resync: impl Fn(),
    ) {
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
                    resync();
                    self.gap("nats");
                }
                marker = markers.next() => match marker {
                    Some(m) => {
                        let reason = String::from_utf8_lossy(&m.payload);
                        let reason: String = reason.chars().take(64).collect();
                        resync();
                        self.gap(&reason);
                    }
                    None => break,
                },
            }
        }
    }

    /// Closes the local sockets of the topics the leader bridge closes (on their close subjects,
    /// which only bridges may publish), with the close frame its `Pgws-Close` header gives.
    /// Runs until shutdown.
    pub(crate) async fn relay_topic_closes(self: Arc<Self>) {
        let mut closes = match self.client.subscribe(self.subjects.topic_closes()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to topic closes");
                return;
            }
        };
        let token = self.shutdown.token.clone();
        loop {
            let msg = tokio::select! {
                _ = token.cancelled() => break,
                msg = closes.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            let Some(subject) = self.subjects.topic_of_close(&msg.subject) else {
                continue;
            };
            let close = msg.headers.get(headers::CLOSE).cloned().unwrap_or_default();
            let (code, reason) = close.split_once(' ').unwrap_or((close.as_str(), ""));
            let code = code.parse().unwrap_or(CLOSE_GOING_AWAY);
            let reason: String = reason.chars().take(120).collect();
            let state = match self.channels.lock() {
                Ok(channels) => channels.get(&subject).cloned(),
                Err(_) => None,
            };
            if let Some(state) = state {
                state.close_all(code, &reason);
            }
        }
    }

    /// Removes socket `id` from `subject`; the last reader's departure ends the subscription.
    pub(crate) fn leave(&self, subject: &str, id: u64) {
        let Ok(mut channels) = self.channels.lock() else {
            return;
        };
        let Some(state) = channels.get(subject) else {
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
            channels.remove(subject);
            self.metrics.channels.dec();
        }
    }

    /// How many sockets of this gateway read `subject` (directly or through the history).
    pub(crate) fn readers(&self, subject: &str) -> usize {
        let Ok(channels) = self.channels.lock() else {
            return 0;
        };
        let keys = [Wrap::Json, Wrap::Text, Wrap::Event].map(|w| resume_key(subject, w));
        std::iter::once(subject)
            .chain(keys.iter().map(String::as_str))
            .filter_map(|key| channels.get(key))
            .filter_map(|state| state.subscribers.read().ok().map(|subs| subs.len()))
            .sum()
    }

    fn open(self: &Arc<Self>, subject: &str, resume: Option<Wrap>) -> Arc<Channel> {
        let (ready, _) = watch::channel(false);
        let state = Arc::new(Channel {
            subscribers: RwLock::new(HashMap::new()),
            ready,
            stop: self.shutdown.token.child_token(),
            last_change: Mutex::new(None),
        });
        self.metrics.channels.inc();
        let hub = Arc::clone(self);
        let subject = subject.to_owned();
        let pump_state = Arc::clone(&state);
        match resume {
            Some(wrap) => self
                .shutdown
                .spawn(async move { hub.pump_history(subject, wrap, pump_state).await }),
            None => self
                .shutdown
                .spawn(async move { hub.pump(subject, pump_state).await }),
        };
        state
    }

    /// A resume entry's pump: the history's tail of `subject`. When the tail cannot start or
    /// ends, its sockets are closed with 1012 (they resume from their last position, on this
    /// gateway or another) and the entry is removed, so the next socket opens a new tail.
    async fn pump_history(&self, subject: String, wrap: Wrap, state: Arc<Channel>) {
        let tail = match &self.history {
            Some(history) => history.tail(&subject).await,
            None => Err(pgws_bus::BusError::Unavailable("no history".to_owned())),
        };
        let mut tail = match tail {
            Ok(tail) => tail,
            Err(e) => {
                tracing::warn!(subject, error = %e, "cannot read the history");
                self.end_resume(&subject, wrap, &state, "history unavailable: try again");
                return;
            }
        };
        state.ready.send_replace(true);
        loop {
            tokio::select! {
                _ = state.stop.cancelled() => return,
                kept = tail.messages.next() => match kept {
                    Some(Ok(kept)) => self.fan_out_kept(&state, &tail.epoch, wrap, &kept),
                    Some(Err(e)) => {
                        tracing::warn!(subject, error = %e, "the history's tail failed");
                        break;
                    }
                    None => break,
                },
            }
        }
        self.end_resume(&subject, wrap, &state, "history interrupted: resume");
    }

    /// Closes a resume entry's sockets with 1012 and removes the entry (if it is still this
    /// one).
    fn end_resume(&self, subject: &str, wrap: Wrap, state: &Arc<Channel>, reason: &str) {
        state.ready.send_replace(true);
        if let Ok(mut channels) = self.channels.lock() {
            let key = resume_key(subject, wrap);
            if channels.get(&key).is_some_and(|c| Arc::ptr_eq(c, state)) {
                channels.remove(&key);
                self.metrics.channels.dec();
            }
        }
        state.close_all(CLOSE_RESTART, reason);
    }

    /// Queues one kept message, framed with its position, to every resuming reader of its
    /// subject (held back for those whose replay runs).
    fn fan_out_kept(&self, state: &Channel, epoch: &str, wrap: Wrap, kept: &pgws_bus::Kept) {
        if !self.first_time(state, &kept.headers) {
            return;
        }
        let position = pgws_bus::format_position(epoch, kept.seq);
        let Some(text) = wrap.frame(&position, &kept.payload) else {
            tracing::warn!("text frame is not UTF-8; dropped");
            return;
        };
        let message = Message::Text(text);
        let len = message_len(&message) as u64;
        let (mut delivered, mut slow, mut spent) = (0u64, 0u64, 0u64);
        if let Ok(subs) = state.subscribers.read() {
            for sub in subs.values() {
                let queued = match &sub.hold {
                    Some(hold) => hold.offer(sub, kept.seq, message.clone(), &mut slow, &mut spent),
                    None => sub.offer(message.clone(), &mut slow, &mut spent),
                };
                delivered += u64::from(queued);
            }
        }
        self.metrics.budget_disconnects.inc_by(spent);
        self.budget.sample();
        self.metrics.slow_consumers.inc_by(slow);
        self.metrics.deliveries.inc_by(delivered);
        self.metrics.bytes_out.inc_by(delivered * len);
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
            if e != pgws_bus::BusError::NoResponders {
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
        drop(sub);
    }

    /// False for a table event whose position the subject already passed on (a leader bridge
    /// that took over publishes again what may have been published already).
    fn first_time(&self, state: &Channel, h: &pgws_bus::Headers) -> bool {
        let Some(at) = h
            .get(headers::CHANGE)
            .and_then(|v| headers::change_position(v))
        else {
            return true;
        };
        let mut last = state.last_change.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|seen| at <= seen) {
            self.metrics.changes_repeated.inc();
            return false;
        }
        *last = Some(at);
        true
    }

    /// Queues one message to every local reader of its subject: one span for the message (not
    /// one per socket), one shared buffer.
    fn fan_out(&self, state: &Channel, msg: pgws_bus::Message) {
        self.metrics.notifications_in.inc();
        let listened_at = msg.headers.get(headers::LISTENED_AT).map(String::as_str);
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
        telemetry::adopt(&span, &msg.headers);
        let _entered = span.enter();
        let header = |name: &str| msg.headers.get(name).cloned();
        if header(headers::CLOSE).is_some() {
            tracing::debug!("a close header on a data subject: dropped");
            return;
        }
        if !self.first_time(state, &msg.headers) {
            return;
        }
        let binary = header(headers::FRAME).is_some_and(|f| f == headers::FRAME_BINARY);
        let payload = msg.payload;
        let len = payload.len() as u64;
        let message = if binary {
            Message::Binary(payload)
        } else {
            match Utf8Bytes::try_from(payload) {
                Ok(text) => Message::Text(text),
                Err(_) => {
                    tracing::warn!("text frame is not UTF-8; dropped");
                    return;
                }
            }
        };
        let (mut delivered, mut slow, mut spent) = (0u64, 0u64, 0u64);
        if let Ok(subs) = state.subscribers.read() {
            for sub in subs.values() {
                delivered += u64::from(sub.offer(message.clone(), &mut slow, &mut spent));
            }
        }
        self.metrics.budget_disconnects.inc_by(spent);
        self.budget.sample();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(budget: &Arc<Budget>) -> (Subscriber, queue::Receiver<Queued>) {
        let (tx, rx) = queue::channel(100);
        let sub = Subscriber {
            tx,
            kick: Kick::new(&CancellationToken::new()),
            bytes: SocketBytes::new(budget),
            hold: None,
        };
        (sub, rx)
    }

    fn frame(n: usize) -> Message {
        Message::Binary(Bytes::from(vec![0u8; n]))
    }

    #[test]
    fn bytes_bound_each_socket_and_the_gateway() {
        let gauge = Gauge::default();
        let budget = Budget::new(300, 200, gauge.clone());
        let (a, mut a_rx) = socket(&budget);
        let (b, _b_rx) = socket(&budget);
        let (mut slow, mut spent) = (0, 0);
        // A message larger than the socket's limit still goes to an empty queue.
        assert!(a.offer(frame(250), &mut slow, &mut spent));
        budget.sample();
        assert_eq!(gauge.get(), 250);
        // More for a backlogged socket over its limit: a slow consumer.
        assert!(!a.offer(frame(10), &mut slow, &mut spent));
        assert_eq!((slow, spent), (1, 0));
        assert_eq!(a.kick.reason().map(|r| r.0), Some(1008));
        // The gateway's budget: b gets one message, not a second while it has a backlog.
        assert!(b.offer(frame(40), &mut slow, &mut spent));
        assert!(!b.offer(frame(40), &mut slow, &mut spent));
        assert_eq!((slow, spent), (1, 1));
        assert!(b.kick.reason().is_some_and(|r| r.1.contains("budget")));
        // Written (or dropped) messages give their bytes back.
        drop(a_rx.try_recv());
        budget.sample();
        assert_eq!(gauge.get(), 40);
        drop(a);
        drop(a_rx);
        drop(b);
        drop(_b_rx);
        budget.sample();
        assert_eq!(gauge.get(), 0);
        assert_eq!(budget.used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_burst_gives_its_bytes_back_once_written() {
        let budget = Budget::new(10_000, 10_000, Gauge::default());
        let (a, mut rx) = socket(&budget);
        let (mut slow, mut spent) = (0, 0);
        for n in [10, 20, 30] {
            assert!(a.offer(frame(n), &mut slow, &mut spent));
        }
        let mut written = None;
        let mut lens = Vec::new();
        while let Some(q) = rx.try_recv() {
            lens.push(message_len(&q.into_message(&mut written)));
        }
        assert_eq!(lens, [10, 20, 30]);
        // Counted until the burst's bytes are released, then given back in full.
        assert_eq!(a.bytes.queued.load(Ordering::Relaxed), 60);
        assert_eq!(budget.used.load(Ordering::Relaxed), 60);
        drop(written);
        assert_eq!(a.bytes.queued.load(Ordering::Relaxed), 0);
        assert_eq!(budget.used.load(Ordering::Relaxed), 0);
    }
}
