//! The history of delivered messages ([`History`]), from which a socket that reconnects is
//! served what it missed: every message kept gets a sequence (increasing across the whole
//! history), and the history has an identity ([`History::epoch`]) that changes when it is lost,
//! so a sequence of another history is never taken for one of this.
//!
//! On NATS a JetStream stream that captures the delivery subjects ([`JetStreamHistory`]: the
//! stream's sequence, and its creation time as the epoch); in one process a list in memory
//! ([`MemoryHistory`]: fed from the bus, gone with the process).
//!
//! A reader of one subject takes what it missed ([`History::replay`]: everything kept after a
//! sequence, up to the last message kept now) and what comes next ([`History::tail`]). Both
//! carry sequences, so a reader that starts its tail before its replay ends can join the two
//! without a gap or a repeat (the gateway does: `ws-gateway/src/resume.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{BusError, Headers, Subscription, SUBSCRIPTION_CAPACITY};

/// One kept message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// Its place in the history: from 1, increasing across every subject.
    pub seq: u64,
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Kept messages in order; an error ends it (the reader missed something and must start
/// again from its last sequence).
pub type KeptStream = Pin<Box<dyn Stream<Item = Result<Kept, BusError>> + Send>>;

/// What a replay found.
pub enum Replay {
    /// The messages after the sequence asked for, up to the last one kept when asked.
    Kept(KeptStream),
    /// The sequence cannot be served: older than what is kept, not issued yet, or of another
    /// history (another epoch).
    Gap,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replay::Kept(_) => f.write_str("Replay::Kept(..)"),
            Replay::Gap => f.write_str("Replay::Gap"),
        }
    }
}

/// A subject's messages from now on, and the epoch of the history they come from.
pub struct Tail {
    pub epoch: String,
    pub messages: KeptStream,
}

/// What a resuming reader needs of the history.
pub trait History: Send + Sync + 'static {
    /// The history's identity now.
    fn epoch(&self) -> BoxFuture<'_, Result<String, BusError>>;

    /// The messages kept on `subject` after `after`, in order, up to the last message kept now
    /// (then the stream ends). [`Replay::Gap`] when `epoch` is not this history's, or when
    /// `after` cannot be served: messages after it are no longer kept (of any subject: the
    /// history does not know which subjects it dropped), or it was never issued.
    fn replay(
        &self,
        subject: &str,
        epoch: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<Replay, BusError>>;

    /// Every message kept on `subject` from now on, in order.
    fn tail(&self, subject: &str) -> BoxFuture<'_, Result<Tail, BusError>>;

    /// Whether a replay after `after` of `epoch` would be served now (not a [`Replay::Gap`]).
    fn servable(&self, epoch: &str, after: u64) -> BoxFuture<'_, Result<bool, BusError>>;
}

/// Whether `after` can be served by a history holding `first..=last` (`first` is `last + 1`
/// when it holds nothing).
fn servable(after: u64, first: u64, last: u64) -> bool {
    after <= last && after.saturating_add(1) >= first
}

/// Replays `subjects` after `after` merged into one stream in sequence order (a reader of
/// several subjects), or [`Replay::Gap`] when any of them is a gap.
pub async fn replay_all(
    history: &dyn History,
    subjects: &[String],
    epoch: &str,
    after: u64,
) -> Result<Replay, BusError> {
    let mut streams = Vec::with_capacity(subjects.len());
    for subject in subjects {
        match history.replay(subject, epoch, after).await? {
            Replay::Kept(s) => streams.push(s),
            Replay::Gap => return Ok(Replay::Gap),
        }
    }
    if streams.len() == 1 {
        return Ok(Replay::Kept(streams.remove(0)));
    }
    Ok(Replay::Kept(merge(streams)))
}

/// Merges streams each in sequence order into one in sequence order.
fn merge(streams: Vec<KeptStream>) -> KeptStream {
    struct Merge {
        streams: Vec<KeptStream>,
        heads: Vec<Option<Kept>>,
        started: bool,
    }
    let state = Merge {
        heads: vec![None; streams.len()],
        streams,
        started: false,
    };
    Box::pin(futures::stream::unfold(state, |mut m| async move {
        if !m.started {
            m.started = true;
            for i in 0..m.streams.len() {
                match m.streams[i].next().await {
                    Some(Ok(k)) => m.heads[i] = Some(k),
                    Some(Err(e)) => return Some((Err(e), m)),
                    None => {}
                }
            }
        }
        let i = m
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|k| (k.seq, i)))
            .min()?
            .1;
        let out = m.heads[i].take()?;
        match m.streams[i].next().await {
            Some(Ok(k)) => m.heads[i] = Some(k),
            Some(Err(e)) => return Some((Err(e), m)),
            None => {}
        }
        Some((Ok(out), m))
    }))
}

/// A position as text: the history's epoch and a sequence (`<epoch>-<seq>`, the sequence in
/// 12 hex digits or more, so positions of one history also sort as text).
pub fn format_position(epoch: &str, seq: u64) -> String {
    format!("{epoch}-{seq:012x}")
}

/// A position read back: `None` when `text` is not one (an epoch of 1 to 32 lower-case hex
/// digits, `-`, a sequence of 1 to 16 hex digits).
pub fn parse_position(text: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = text.split_once('-')?;
    let hex = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(epoch, 32) || !hex(seq, 16) {
        return None;
    }
    Some((epoch, u64::from_str_radix(seq, 16).ok()?))
}

// ------------------------------------------------------------------ in memory

/// The history of one process: messages kept in memory for `max_age` and at most `max_bytes`
/// (payloads and subjects), a message whose `Nats-Msg-Id` is kept already dropped (as
/// JetStream's duplicate window does), fed with [`MemoryHistory::keep`] (or from a bus subscription,
/// [`MemoryHistory::keep_from`]). Its epoch is new for every process, so positions of an
/// earlier process are gaps.
#[derive(Clone)]
pub struct MemoryHistory {
    inner: Arc<Memory>,
}

struct Memory {
    epoch: String,
    max_age: Duration,
    max_bytes: usize,
    state: Mutex<MemoryState>,
}

struct MemoryState {
    kept: VecDeque<(Instant, Kept)>,
    bytes: usize,
    /// The sequence the next message gets.
    next: u64,
    tails: HashMap<String, Vec<mpsc::Sender<Result<Kept, BusError>>>>,
    /// The `Nats-Msg-Id`s of the messages kept.
    ids: HashSet<String>,
}

impl MemoryState {
    /// The first sequence held (`next` when none is).
    fn first(&self) -> u64 {
        self.kept.front().map_or(self.next, |(_, k)| k.seq)
    }

    fn expire(&mut self, max_age: Duration, max_bytes: usize) {
        let now = Instant::now();
        while let Some((at, k)) = self.kept.front() {
            if now.duration_since(*at) <= max_age && self.bytes <= max_bytes {
                break;
            }
            self.bytes -= size(k);
            if let Some(id) = k.headers.get(MSG_ID) {
                self.ids.remove(id);
            }
            self.kept.pop_front();
        }
    }
}

/// The header a message is deduplicated by.
const MSG_ID: &str = "Nats-Msg-Id";

fn size(k: &Kept) -> usize {
    k.payload.len() + k.subject.len()
}

impl MemoryHistory {
    pub fn new(max_age: Duration, max_bytes: usize) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // The clock and the process id: different for every process of a machine.
        let epoch = format!("{:x}", nanos ^ (u128::from(std::process::id()) << 64));
        Self {
            inner: Arc::new(Memory {
                epoch,
                max_age,
                max_bytes,
                state: Mutex::new(MemoryState {
                    kept: VecDeque::new(),
                    bytes: 0,
                    next: 1,
                    tails: HashMap::new(),
                    ids: HashSet::new(),
                }),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a message, and hands it to the tails of its subject (a tail that does not keep up
    /// is ended).
    pub fn keep(&self, subject: &str, headers: Headers, payload: Bytes) {
        let mut state = self.lock();
        if let Some(id) = headers.get(MSG_ID) {
            if !state.ids.insert(id.clone()) {
                return;
            }
        }
        let kept = Kept {
            seq: state.next,
            subject: subject.to_owned(),
            headers,
            payload,
        };
        state.next += 1;
        state.bytes += size(&kept);
        if let Some(tails) = state.tails.get_mut(subject) {
            tails.retain(|tx| tx.try_send(Ok(kept.clone())).is_ok());
            if tails.is_empty() {
                state.tails.remove(subject);
            }
        }
        state.kept.push_back((Instant::now(), kept));
        state.expire(self.inner.max_age, self.inner.max_bytes);
    }

    /// Whether `after` of `epoch` can be served from what `state` still keeps.
    fn serves(&self, state: &mut MemoryState, epoch: &str, after: u64) -> bool {
        state.expire(self.inner.max_age, self.inner.max_bytes);
        epoch == self.inner.epoch && servable(after, state.first(), state.next - 1)
    }

    /// Keeps every message of `subscription` until it ends.
    pub async fn keep_from(&self, mut subscription: Subscription) {
        while let Some(m) = subscription.next().await {
            self.keep(&m.subject, m.headers, m.payload);
        }
    }
}

impl std::fmt::Debug for MemoryHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHistory")
            .field("epoch", &self.inner.epoch)
            .finish_non_exhaustive()
    }
}

impl History for MemoryHistory {
    fn epoch(&self) -> BoxFuture<'_, Result<String, BusError>> {
        Box::pin(async move { Ok(self.inner.epoch.clone()) })
    }

    fn replay(
        &self,
        subject: &str,
        epoch: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<Replay, BusError>> {
        let mut state = self.lock();
        let replay = if self.serves(&mut state, epoch, after) {
            let kept: Vec<Result<Kept, BusError>> = state
                .kept
                .iter()
                .filter(|(_, k)| k.seq > after && k.subject == subject)
                .map(|(_, k)| Ok(k.clone()))
                .collect();
            Replay::Kept(Box::pin(futures::stream::iter(kept)))
        } else {
            Replay::Gap
        };
        drop(state);
        Box::pin(async move { Ok(replay) })
    }

    fn servable(&self, epoch: &str, after: u64) -> BoxFuture<'_, Result<bool, BusError>> {
        let ok = self.serves(&mut self.lock(), epoch, after);
        Box::pin(async move { Ok(ok) })
    }

    fn tail(&self, subject: &str) -> BoxFuture<'_, Result<Tail, BusError>> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        self.lock()
            .tails
            .entry(subject.to_owned())
            .or_default()
            .push(tx);
        let tail = Tail {
            epoch: self.inner.epoch.clone(),
            messages: Box::pin(tokio_stream_of(rx)),
        };
        Box::pin(async move { Ok(tail) })
    }
}

fn tokio_stream_of<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

// ------------------------------------------------------------------ JetStream

/// The history in a JetStream stream that captures the delivery subjects (the caller
/// configures and creates it). Positions are the stream's sequences; the epoch is the
/// stream's creation time, so a stream deleted and made again is another history.
#[derive(Clone)]
pub struct JetStreamHistory {
    js: async_nats::jetstream::Context,
    stream: String,
}

impl JetStreamHistory {
    pub fn new(js: async_nats::jetstream::Context, stream: &str) -> Self {
        Self {
            js,
            stream: stream.to_owned(),
        }
    }

    async fn stream(&self) -> Result<async_nats::jetstream::stream::Stream, BusError> {
        self.js.get_stream(&self.stream).await.map_err(unavailable)
    }
}

impl std::fmt::Debug for JetStreamHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamHistory")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn epoch_of(info: &async_nats::jetstream::stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos())
}

/// Whether the stream of `info` can serve `after` of `epoch`.
fn serves(info: &async_nats::jetstream::stream::Info, epoch: &str, after: u64) -> bool {
    let state = &info.state;
    epoch == epoch_of(info) && servable(after, state.first_sequence, state.last_sequence)
}

/// An ordered consumer of `stream` reading `subject` from `start` on.
async fn ordered_from(
    stream: &async_nats::jetstream::stream::Stream,
    subject: String,
    start: u64,
) -> Result<async_nats::jetstream::consumer::Consumer<OrderedConfig>, BusError> {
    stream
        .create_consumer(OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(unavailable)
}

fn kept_of(
    m: Result<async_nats::jetstream::Message, impl std::fmt::Display>,
) -> Result<(Kept, u64), BusError> {
    let m = m.map_err(unavailable)?;
    let (seq, pending) = m
        .info()
        .map(|i| (i.stream_sequence, i.pending))
        .map_err(unavailable)?;
    let message = crate::nats::message(m.message);
    Ok((
        Kept {
            seq,
            subject: message.subject,
            headers: message.headers,
            payload: message.payload,
        },
        pending,
    ))
}

impl History for JetStreamHistory {
    fn epoch(&self) -> BoxFuture<'_, Result<String, BusError>> {
        Box::pin(async move { Ok(epoch_of(self.stream().await?.cached_info())) })
    }

    fn replay(
        &self,
        subject: &str,
        epoch: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<Replay, BusError>> {
        let subject = subject.to_owned();
        let epoch = epoch.to_owned();
        Box::pin(async move {
            let stream = self.stream().await?;
            let info = stream.cached_info();
            if !serves(info, &epoch, after) {
                return Ok(Replay::Gap);
            }
            let empty = || Ok(Replay::Kept(Box::pin(futures::stream::empty())));
            if after == info.state.last_sequence {
                return empty();
            }
            let consumer = ordered_from(&stream, subject, after + 1).await?;
            if consumer.cached_info().num_pending == 0 {
                return empty();
            }
            let messages = consumer.messages().await.map_err(unavailable)?;
            // Read until the consumer has nothing pending: the last message kept when the
            // replay was asked for, or later.
            let kept = futures::stream::unfold(Some(messages), |messages| async move {
                let mut messages = messages?;
                match messages.next().await {
                    Some(m) => match kept_of(m) {
                        Ok((kept, 0)) => Some((Ok(kept), None)),
                        Ok((kept, _)) => Some((Ok(kept), Some(messages))),
                        Err(e) => Some((Err(e), None)),
                    },
                    None => Some((Err(unavailable("the replay ended early")), None)),
                }
            });
            Ok(Replay::Kept(Box::pin(kept)))
        })
    }

    fn servable(&self, epoch: &str, after: u64) -> BoxFuture<'_, Result<bool, BusError>> {
        let epoch = epoch.to_owned();
        Box::pin(async move { Ok(serves(self.stream().await?.cached_info(), &epoch, after)) })
    }

    fn tail(&self, subject: &str) -> BoxFuture<'_, Result<Tail, BusError>> {
        let subject = subject.to_owned();
        Box::pin(async move {
            let stream = self.stream().await?;
            let info = stream.cached_info();
            let epoch = epoch_of(info);
            let after = info.state.last_sequence;
            let consumer = ordered_from(&stream, subject, after + 1).await?;
            let messages = consumer.messages().await.map_err(unavailable)?;
            // An ordered consumer that is made again before its first message starts from the
            // stream's beginning (async-nats): only what follows the last message passed on.
            let mut last = after;
            let messages = messages.filter_map(move |m| {
                let kept = match kept_of(m) {
                    Ok((kept, _)) if kept.seq <= last => None,
                    Ok((kept, _)) => {
                        last = kept.seq;
                        Some(Ok(kept))
                    }
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(kept)
            });
            Ok(Tail {
                epoch,
                messages: Box::pin(messages),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_back_and_refuse_what_is_not_one() {
        let p = format_position("18f3a", 42);
        assert_eq!(p, "18f3a-00000000002a");
        assert_eq!(parse_position(&p), Some(("18f3a", 42)));
        assert!(format_position("1", 9) < format_position("1", 10));
        for bad in [
            "",
            "-",
            "abc",
            "x-1",
            "1-",
            "-1",
            "1-g",
            "1-1-1",
            "A-1",
            "1-12345678901234567",
        ] {
            assert_eq!(parse_position(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn servable_positions() {
        // Holding 5..=9.
        assert!(servable(4, 5, 9));
        assert!(servable(9, 5, 9));
        assert!(!servable(3, 5, 9), "5 and older were dropped");
        assert!(!servable(10, 5, 9), "never issued");
        // Holding nothing after 9.
        assert!(servable(9, 10, 9));
        assert!(!servable(8, 10, 9));
    }
}
