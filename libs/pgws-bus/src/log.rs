//! The durable log behind the audit ([`Log`]): appends deduplicated by an id, read in order by
//! a named consumer that acknowledges each record after use; a record not acknowledged within
//! the consumer's ack wait, or handed back, comes again. On NATS a JetStream stream and a
//! durable pull consumer ([`JetStreamLog`]); in one process a list in memory
//! ([`MemoryLog`]), which lives as long as the process.
//!
//! A [`Record`] says where it is (the log's name and its sequence there: together unique, as
//! a dead letter needs), the id it was appended with, and how many times it was delivered (a
//! consumer that writes idempotently takes a faster path for records it never saw). A
//! consumer's lag is [`Log::pending`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{BusError, Headers};

/// What the audit needs of a log.
pub trait Log: Send + Sync + 'static {
    /// Appends a record; resolves once the log holds it. A second append with the same `id`
    /// is held once.
    fn append(
        &self,
        subject: &str,
        id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>>;

    /// Up to `max` records for `consumer` (new ones in order, and ones due again), waiting at
    /// most `wait` for the first (JetStream: and up to 100 ms more for what the server sent
    /// before the pull ended).
    fn fetch(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Record>, BusError>>;

    /// How many records `consumer` has not acknowledged yet: those it never received and
    /// those it holds unacknowledged (its lag).
    fn pending(&self, consumer: &str) -> BoxFuture<'_, Result<u64, BusError>>;
}

/// One record as a consumer receives it; acknowledge it ([`Record::ack`]) once used.
pub struct Record {
    pub subject: String,
    /// The id it was appended with (on JetStream its `Nats-Msg-Id`, which is not among the
    /// headers; `None` for a message published to the stream without one).
    pub id: Option<String>,
    pub headers: Headers,
    pub payload: Bytes,
    /// The name of the log it is in (a JetStream stream's name; a [`MemoryLog`]'s own, unique
    /// to it): with [`Record::seq`], unique to the record.
    pub stream: String,
    /// Its position in the log, from 1 in the order appended (JetStream: the stream
    /// sequence). A repeated id takes none.
    pub seq: u64,
    /// How many times it was delivered to this consumer, this time included: 1 the first
    /// time (0 when JetStream did not say).
    pub delivered: u64,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("subject", &self.subject)
            .field("id", &self.id)
            .field("headers", &self.headers)
            .field("payload", &self.payload)
            .field("stream", &self.stream)
            .field("seq", &self.seq)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl Record {
    /// Whether the record may have been delivered before (to this consumer, or to another
    /// replica sharing it): any delivery but a known first one.
    pub fn redelivered(&self) -> bool {
        self.delivered != 1
    }

    /// Done with: it does not come again.
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Not done with: it comes again after `delay`.
    pub async fn hand_back(self, delay: Duration) -> Result<(), BusError> {
        self.acker.hand_back(delay).await
    }
}

trait Acker: Send + Sync {
    fn ack(&self) -> BoxFuture<'_, Result<(), BusError>>;
    fn hand_back(&self, delay: Duration) -> BoxFuture<'_, Result<(), BusError>>;
}

// ------------------------------------------------------------------ in memory

/// The log of one process. It keeps every record and id for its life (no retention, no
/// dedup window): meant for tests and short runs, not for an audit that runs for months. An
/// empty id is not deduplicated (as JetStream ignores an empty `Nats-Msg-Id`).
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Memory>,
}

struct Memory {
    state: Mutex<State>,
    appended: Notify,
    ack_wait: Duration,
    /// `memory-<creation time>-<n>`: sequences restart with each log, names do not.
    name: String,
}

#[derive(Default)]
struct State {
    /// Record `seq` at index `seq - 1`: subject, id, headers, payload.
    records: Vec<(String, String, Headers, Bytes)>,
    ids: HashMap<String, usize>,
    consumers: HashMap<String, Cursor>,
}

#[derive(Default)]
struct Cursor {
    /// The first record never delivered.
    next: usize,
    /// Delivered and not acknowledged: when each is due again, and how many times it was
    /// delivered.
    pending: BTreeMap<usize, (Instant, u64)>,
}

impl MemoryLog {
    /// An empty log whose consumers get a record again `ack_wait` after it was delivered
    /// unless acknowledged.
    pub fn new(ack_wait: Duration) -> Self {
        static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        Self {
            inner: Arc::new(Memory {
                state: Mutex::default(),
                appended: Notify::new(),
                ack_wait,
                name: format!("memory-{micros}-{n}"),
            }),
        }
    }

    /// The log's name, as its records carry it in [`Record::stream`].
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn take(&self, consumer: &str, max: usize) -> (Vec<Record>, Option<Instant>) {
        let now = Instant::now();
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let State {
            records, consumers, ..
        } = &mut *state;
        let cursor = consumers.entry(consumer.to_owned()).or_default();
        let mut seqs: Vec<usize> = cursor
            .pending
            .iter()
            .filter(|(_, (due, _))| *due <= now)
            .map(|(seq, _)| *seq)
            .take(max)
            .collect();
        while seqs.len() < max && cursor.next < records.len() {
            seqs.push(cursor.next);
            cursor.next += 1;
        }
        let due = now + self.inner.ack_wait;
        let taken = seqs
            .into_iter()
            .map(|seq| {
                let delivered = cursor.pending.get(&seq).map_or(0, |(_, n)| *n) + 1;
                cursor.pending.insert(seq, (due, delivered));
                let (subject, id, headers, payload) = records[seq].clone();
                Record {
                    subject,
                    id: Some(id),
                    headers,
                    payload,
                    stream: self.inner.name.clone(),
                    seq: seq as u64 + 1,
                    delivered,
                    acker: Box::new(MemoryAck {
                        log: Arc::downgrade(&self.inner),
                        consumer: consumer.to_owned(),
                        seq,
                    }),
                }
            })
            .collect();
        (taken, cursor.pending.values().map(|(due, _)| *due).min())
    }
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLog").finish_non_exhaustive()
    }
}

struct MemoryAck {
    log: Weak<Memory>,
    consumer: String,
    seq: usize,
}

impl MemoryAck {
    fn set(&self, due: Option<Instant>) {
        let Some(log) = self.log.upgrade() else {
            return;
        };
        let mut state = log.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cursor) = state.consumers.get_mut(&self.consumer) {
            match due {
                None => {
                    cursor.pending.remove(&self.seq);
                }
                Some(due) => {
                    if let Some((at, _)) = cursor.pending.get_mut(&self.seq) {
                        *at = due;
                    }
                }
            }
        }
        drop(state);
        log.appended.notify_waiters();
    }
}

impl Acker for MemoryAck {
    fn ack(&self) -> BoxFuture<'_, Result<(), BusError>> {
        self.set(None);
        Box::pin(async { Ok(()) })
    }

    fn hand_back(&self, delay: Duration) -> BoxFuture<'_, Result<(), BusError>> {
        self.set(Some(Instant::now() + delay));
        Box::pin(async { Ok(()) })
    }
}

impl Log for MemoryLog {
    fn append(
        &self,
        subject: &str,
        id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        let result = if crate::valid_subject(subject) {
            let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            if id.is_empty() || !state.ids.contains_key(id) {
                let seq = state.records.len();
                state
                    .records
                    .push((subject.to_owned(), id.to_owned(), headers, payload));
                if !id.is_empty() {
                    state.ids.insert(id.to_owned(), seq);
                }
            }
            drop(state);
            self.inner.appended.notify_waiters();
            Ok(())
        } else {
            Err(BusError::InvalidSubject(subject.to_owned()))
        };
        Box::pin(async move { result })
    }

    fn fetch(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Record>, BusError>> {
        let consumer = consumer.to_owned();
        Box::pin(async move {
            let deadline = Instant::now() + wait;
            loop {
                let appended = self.inner.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let (records, next_due) = self.take(&consumer, max.max(1));
                if !records.is_empty() || Instant::now() >= deadline {
                    return Ok(records);
                }
                let until = next_due.map_or(deadline, |due| due.min(deadline));
                tokio::select! {
                    _ = appended => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
        })
    }

    fn pending(&self, consumer: &str) -> BoxFuture<'_, Result<u64, BusError>> {
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let pending = state
            .consumers
            .get(consumer)
            .map_or(state.records.len(), |c| {
                state.records.len() - c.next + c.pending.len()
            });
        drop(state);
        Box::pin(async move { Ok(pending as u64) })
    }
}

// ------------------------------------------------------------------ JetStream

/// The log on a JetStream stream (which the caller configures and creates); each consumer
/// name is a durable pull consumer with explicit acks, created when first used (an existing
/// one is used as it is).
#[derive(Clone)]
pub struct JetStreamLog {
    js: async_nats::jetstream::Context,
    stream: String,
    ack_wait: Duration,
    max_ack_pending: Option<i64>,
    consumers: Arc<tokio::sync::Mutex<HashMap<String, PullConsumer>>>,
}

type PullConsumer =
    async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>;

impl JetStreamLog {
    pub fn new(js: async_nats::jetstream::Context, stream: &str, ack_wait: Duration) -> Self {
        Self {
            js,
            stream: stream.to_owned(),
            ack_wait,
            max_ack_pending: None,
            consumers: Arc::default(),
        }
    }

    /// The same log, whose consumers (those it creates) hold at most `max` records delivered
    /// and not yet acknowledged (the server's default otherwise).
    #[must_use]
    pub fn with_max_ack_pending(mut self, max: i64) -> Self {
        self.max_ack_pending = Some(max);
        self
    }

    async fn consumer(&self, name: &str) -> Result<PullConsumer, BusError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(name) {
            return Ok(c.clone());
        }
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(unavailable)?;
        let consumer = stream
            .get_or_create_consumer(
                name,
                async_nats::jetstream::consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: self.max_ack_pending.unwrap_or_default(),
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        consumers.insert(name.to_owned(), consumer.clone());
        Ok(consumer)
    }
}

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

struct JetStreamAck(async_nats::jetstream::message::Acker);

impl Acker for JetStreamAck {
    fn ack(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move { self.0.ack().await.map_err(unavailable) })
    }

    fn hand_back(&self, delay: Duration) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            self.0
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(unavailable)
        })
    }
}

impl Log for JetStreamLog {
    fn append(
        &self,
        subject: &str,
        id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        let subject = subject.to_owned();
        let id = id.to_owned();
        Box::pin(async move {
            if !crate::valid_subject(&subject) {
                return Err(BusError::InvalidSubject(subject));
            }
            let mut map = crate::nats::header_map(headers);
            map.insert(MSG_ID, id.as_str());
            self.js
                .publish_with_headers(subject, map, payload)
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn fetch(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Record>, BusError>> {
        let consumer = consumer.to_owned();
        Box::pin(async move {
            let consumer = self.consumer(&consumer).await?;
            let mut batch = consumer
                .fetch()
                .max_messages(max.max(1))
                .expires(wait)
                .messages()
                .await
                .map_err(unavailable)?;
            // The server ends the pull when `wait` is over, but does not always say so (seen
            // with nats-server 2.9 when the request expires while records still arrive), and
            // async-nats then waits five seconds more: the pull is read until `wait` and a grace
            // for what the server sent before its end to arrive.
            let deadline = Instant::now() + wait + FETCH_GRACE;
            let mut records = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout_at(deadline, batch.next()).await {
                let m = m.map_err(unavailable)?;
                let (seq, delivered) = m
                    .info()
                    .map(|i| (i.stream_sequence, u64::try_from(i.delivered).unwrap_or(0)))
                    .unwrap_or_default();
                // Taken apart, not cloned: the acker keeps only the reply subject.
                let (message, acker) = m.split();
                let mut message = crate::nats::message(message);
                let id = message.headers.remove(MSG_ID);
                records.push(Record {
                    subject: message.subject,
                    id,
                    headers: message.headers,
                    payload: message.payload,
                    stream: self.stream.clone(),
                    seq,
                    delivered,
                    acker: Box::new(JetStreamAck(acker)),
                });
            }
            Ok(records)
        })
    }

    fn pending(&self, consumer: &str) -> BoxFuture<'_, Result<u64, BusError>> {
        let consumer = consumer.to_owned();
        Box::pin(async move {
            let info = self
                .consumer(&consumer)
                .await?
                .get_info()
                .await
                .map_err(unavailable)?;
            Ok(info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0))
        })
    }
}

/// How long a JetStream fetch reads after its wait, for what the server sent before the pull
/// ended.
const FETCH_GRACE: Duration = Duration::from_millis(100);

/// The header JetStream deduplicates by.
const MSG_ID: &str = "Nats-Msg-Id";
