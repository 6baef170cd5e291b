//! The durable log behind the audit ([`Log`]): appends deduplicated by an id, read in order by
//! a named consumer that acknowledges each record after use; a record not acknowledged within
//! the consumer's ack wait, or handed back, comes again. On NATS a JetStream stream and a
//! durable pull consumer ([`JetStreamLog`]); in one process a list in memory
//! ([`MemoryLog`]), which lives as long as the process.

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
    /// most `wait` for the first.
    fn fetch(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Record>, BusError>>;
}

/// One record as a consumer receives it; acknowledge it ([`Record::ack`]) once used.
pub struct Record {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("subject", &self.subject)
            .field("headers", &self.headers)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

impl Record {
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
/// dedup window): meant for tests and short runs, not for an audit that runs for months.
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Memory>,
}

struct Memory {
    state: Mutex<State>,
    appended: Notify,
    ack_wait: Duration,
}

#[derive(Default)]
struct State {
    records: Vec<(String, Headers, Bytes)>,
    ids: HashMap<String, usize>,
    consumers: HashMap<String, Cursor>,
}

#[derive(Default)]
struct Cursor {
    /// The first record never delivered.
    next: usize,
    /// Delivered and not acknowledged: when each is due again.
    pending: BTreeMap<usize, Instant>,
}

impl MemoryLog {
    /// An empty log whose consumers get a record again `ack_wait` after it was delivered
    /// unless acknowledged.
    pub fn new(ack_wait: Duration) -> Self {
        Self {
            inner: Arc::new(Memory {
                state: Mutex::default(),
                appended: Notify::new(),
                ack_wait,
            }),
        }
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
            .filter(|(_, due)| **due <= now)
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
                cursor.pending.insert(seq, due);
                let (subject, headers, payload) = records[seq].clone();
                Record {
                    subject,
                    headers,
                    payload,
                    acker: Box::new(MemoryAck {
                        log: Arc::downgrade(&self.inner),
                        consumer: consumer.to_owned(),
                        seq,
                    }),
                }
            })
            .collect();
        (taken, cursor.pending.values().min().copied())
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
                    if let Some(at) = cursor.pending.get_mut(&self.seq) {
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
            if !state.ids.contains_key(id) {
                let seq = state.records.len();
                state.records.push((subject.to_owned(), headers, payload));
                state.ids.insert(id.to_owned(), seq);
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
}

// ------------------------------------------------------------------ JetStream

/// The log on a JetStream stream (which the caller configures and creates); each consumer
/// name is a durable pull consumer with explicit acks.
#[derive(Clone)]
pub struct JetStreamLog {
    js: async_nats::jetstream::Context,
    stream: String,
    ack_wait: Duration,
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
            consumers: Arc::default(),
        }
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

struct JetStreamAck(async_nats::jetstream::Message);

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
            map.insert("Nats-Msg-Id", id.as_str());
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
            let mut records = Vec::new();
            while let Some(m) = batch.next().await {
                let m = m.map_err(unavailable)?;
                let message = crate::nats::message(m.message.clone());
                records.push(Record {
                    subject: message.subject,
                    headers: message
                        .headers
                        .into_iter()
                        .filter(|(k, _)| k != "Nats-Msg-Id")
                        .collect(),
                    payload: message.payload,
                    acker: Box::new(JetStreamAck(m)),
                });
            }
            Ok(records)
        })
    }
}
