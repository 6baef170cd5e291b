//! The message bus the services talk over, behind one seam ([`Bus`]): publish and subscribe
//! with headers and NATS-style wildcard subjects (`*` one token, `>` the rest), queue groups
//! (each message to one member of a group), and request/reply with "no responders" and
//! timeouts.
//!
//! Two adapters give the same semantics, checked by one conformance suite
//! (`tests/conformance.rs`) run on both:
//! - [`Nats`]: async-nats, for services in several processes or on several machines;
//! - [`Local`]: tokio primitives, for the roles of one process.
//!
//! The audit's durable log is a second seam ([`Log`]): appends deduplicated by id, read by
//! named consumers that acknowledge each record ([`JetStreamLog`], [`MemoryLog`]). The
//! history of delivered messages is a third ([`History`]: replay after a sequence, tail from
//! now; [`JetStreamHistory`], [`MemoryHistory`]).
//!
//! Delivery is at most once, as core NATS: a subscriber whose queue is full (it does not
//! read) loses the messages that do not fit, and the bus counts them ([`Subscription`]).
//! Messages from one publisher to one subscriber keep their order.

mod history;
mod local;
mod log;
mod nats;
mod subject;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;
use tokio::sync::mpsc;

pub use history::{
    format_position, parse_position, replay_all, History, JetStreamHistory, Kept, KeptStream,
    MemoryHistory, Replay, Tail,
};
pub use local::Local;
pub use log::{JetStreamLog, Log, MemoryLog, Record};
pub use nats::Nats;
pub use subject::{matches, valid_pattern, valid_subject};

/// Message headers: one value per name.
pub type Headers = BTreeMap<String, String>;

/// A message as a subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The subject it was published on.
    pub subject: String,
    /// Where to answer (a request), if anywhere.
    pub reply: Option<String>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A request found no subscriber on its subject.
    #[error("no responders")]
    NoResponders,
    /// A request had no answer in time.
    #[error("request timed out")]
    TimedOut,
    /// A subject that is not valid (empty tokens, spaces, wildcards where none may be).
    #[error("invalid subject {0:?}")]
    InvalidSubject(String),
    /// The bus is closed or its connection failed.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// What the services do over the bus.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` on `subject` (no wildcards).
    fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>>;

    /// Subscribes to `pattern` (wildcards allowed); with `queue`, each message goes to one
    /// subscriber of the group. Resolves once the subscription receives what is published
    /// after it.
    fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>>;

    /// Publishes a request and waits at most `timeout` for the first answer.
    fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Message, BusError>>;

    /// Resolves once what was published before has left this process.
    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>>;

    /// The largest payload one message may carry.
    fn max_payload(&self) -> usize;
}

/// Messages of one subscription, in the order received; the subscription ends when dropped.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
}

impl Subscription {
    /// A subscription read from a channel; `guard` keeps it registered and is dropped with it.
    fn channel(rx: mpsc::Receiver<Message>, guard: impl Send + 'static) -> Self {
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let m = rx.recv().await?;
            Some((m, (rx, guard)))
        });
        Self::stream(stream)
    }

    /// A subscription read from an adapter's own stream (which ends the subscription when
    /// dropped).
    fn stream(stream: impl Stream<Item = Message> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(stream),
        }
    }

    /// The next message; `None` when the bus closed the subscription.
    pub async fn next(&mut self) -> Option<Message> {
        futures::StreamExt::next(&mut self.inner).await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// Most messages a subscription holds unread before the bus drops what does not fit.
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// The largest payload of a message on the in-process bus (NATS servers default to 1 MiB).
pub const LOCAL_MAX_PAYLOAD: usize = 8 * 1024 * 1024;

/// How long [`Client::request`] waits for an answer (as async-nats does by default).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle on a bus, cheap to clone, with the calls the services make (named as async-nats
/// names them).
#[derive(Clone)]
pub struct Client {
    bus: Arc<dyn Bus>,
}

impl Client {
    pub fn new(bus: impl Bus) -> Self {
        Self { bus: Arc::new(bus) }
    }

    /// Publishes `payload` on `subject`.
    pub async fn publish(&self, subject: impl AsRef<str>, payload: Bytes) -> Result<(), BusError> {
        self.bus
            .publish(subject.as_ref(), Headers::new(), payload)
            .await
    }

    /// Publishes `payload` on `subject` with `headers`.
    pub async fn publish_with_headers(
        &self,
        subject: impl AsRef<str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.bus.publish(subject.as_ref(), headers, payload).await
    }

    /// Subscribes to `pattern` (wildcards allowed).
    pub async fn subscribe(&self, pattern: impl AsRef<str>) -> Result<Subscription, BusError> {
        self.bus.subscribe(pattern.as_ref(), None).await
    }

    /// Subscribes to `pattern` as a member of `queue`: each message goes to one member.
    pub async fn queue_subscribe(
        &self,
        pattern: impl AsRef<str>,
        queue: impl AsRef<str>,
    ) -> Result<Subscription, BusError> {
        self.bus
            .subscribe(pattern.as_ref(), Some(queue.as_ref()))
            .await
    }

    /// A request waiting at most [`REQUEST_TIMEOUT`] for its answer.
    pub async fn request(
        &self,
        subject: impl AsRef<str>,
        payload: Bytes,
    ) -> Result<Message, BusError> {
        self.bus
            .request(subject.as_ref(), Headers::new(), payload, REQUEST_TIMEOUT)
            .await
    }

    /// A request with headers, waiting at most `timeout` for its answer.
    pub async fn request_with_headers(
        &self,
        subject: impl AsRef<str>,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        self.bus
            .request(subject.as_ref(), headers, payload, timeout)
            .await
    }

    /// Resolves once what was published before has left this process.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.bus.flush().await
    }

    /// The largest payload one message may carry.
    pub fn max_payload(&self) -> usize {
        self.bus.max_payload()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}
