//! The in-process bus: subscriptions behind a lock (those of one exact subject found by it, those
//! with wildcards in a list), each a bounded tokio channel.
//! A publish matches every subscription's pattern, sends a copy to each plain subscription and
//! to one member of each queue group (in turn), and returns at once; a subscription whose
//! channel is full loses the message (counted by [`Local::dropped`]), as a slow consumer does
//! on NATS.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::subject::{matches, valid_pattern, valid_subject};
use crate::{Bus, BusError, Headers, Message, Subscription, SUBSCRIPTION_CAPACITY};

/// The in-process bus; cheap to clone (clones share the subscriptions).
#[derive(Clone, Default)]
pub struct Local {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    subscriptions: RwLock<Subscriptions>,
    next_id: AtomicU64,
    /// Turns of the queue groups: which member gets the next message.
    turn: AtomicUsize,
    dropped: AtomicU64,
}

/// The subscriptions: by exact subject, and those whose pattern has wildcards.
#[derive(Default)]
struct Subscriptions {
    exact: HashMap<String, Vec<Entry>>,
    wildcard: Vec<Entry>,
}

impl Subscriptions {
    fn add(&mut self, entry: Entry) {
        if entry.pattern.split('.').any(|t| t == "*" || t == ">") {
            self.wildcard.push(entry);
        } else {
            self.exact
                .entry(entry.pattern.clone())
                .or_default()
                .push(entry);
        }
    }

    fn remove(&mut self, pattern: &str, id: u64) {
        if let Some(entries) = self.exact.get_mut(pattern) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                self.exact.remove(pattern);
            }
        }
        self.wildcard.retain(|e| e.id != id);
    }

    /// Every subscription `subject` matches.
    fn matching<'a>(&'a self, subject: &'a str) -> impl Iterator<Item = &'a Entry> {
        self.exact.get(subject).into_iter().flatten().chain(
            self.wildcard
                .iter()
                .filter(|e| matches(&e.pattern, subject)),
        )
    }
}

struct Entry {
    id: u64,
    pattern: String,
    queue: Option<String>,
    tx: mpsc::Sender<Message>,
}

/// Removes its subscription when the [`Subscription`] is dropped.
struct Registered {
    inner: Weak<Inner>,
    pattern: String,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut subs = inner
                .subscriptions
                .write()
                .unwrap_or_else(|e| e.into_inner());
            subs.remove(&self.pattern, self.id);
        }
    }
}

impl Local {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages lost so far because a subscription's channel was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    fn register(&self, pattern: &str, queue: Option<&str>, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add(Entry {
                id,
                pattern: pattern.to_owned(),
                queue: queue.map(str::to_owned),
                tx,
            });
        let guard = Registered {
            inner: Arc::downgrade(&self.inner),
            pattern: pattern.to_owned(),
            id,
        };
        Subscription::channel(rx, guard)
    }

    /// Delivers `message`; returns how many subscriptions and queue groups it matched.
    fn deliver(&self, message: &Message) -> usize {
        let subs = self
            .inner
            .subscriptions
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut groups: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        let mut matched = 0;
        for entry in subs.matching(&message.subject) {
            match &entry.queue {
                Some(q) => groups.entry(q.as_str()).or_default().push(entry),
                None => {
                    matched += 1;
                    self.offer(entry, message);
                }
            }
        }
        for members in groups.values() {
            matched += 1;
            let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
            self.offer(members[turn % members.len()], message);
        }
        matched
    }

    fn offer(&self, entry: &Entry, message: &Message) {
        if let Err(mpsc::error::TrySendError::Full(_)) = entry.tx.try_send(message.clone()) {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").finish_non_exhaustive()
    }
}

impl Bus for Local {
    fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        let result = if valid_subject(subject) {
            self.deliver(&Message {
                subject: subject.to_owned(),
                reply: None,
                headers,
                payload,
            });
            Ok(())
        } else {
            Err(BusError::InvalidSubject(subject.to_owned()))
        };
        Box::pin(async move { result })
    }

    fn subscribe(
        &self,
        pattern: &str,
        queue: Option<&str>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>> {
        let result = if valid_pattern(pattern) && queue.is_none_or(valid_subject) {
            Ok(self.register(pattern, queue, SUBSCRIPTION_CAPACITY))
        } else {
            Err(BusError::InvalidSubject(pattern.to_owned()))
        };
        Box::pin(async move { result })
    }

    fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Message, BusError>> {
        let subject = subject.to_owned();
        Box::pin(async move {
            if !valid_subject(&subject) {
                return Err(BusError::InvalidSubject(subject));
            }
            let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let inbox = format!("_INBOX.local.{n}");
            let mut answers = self.register(&inbox, None, 1);
            let request = Message {
                subject,
                reply: Some(inbox),
                headers,
                payload,
            };
            if self.deliver(&request) == 0 {
                return Err(BusError::NoResponders);
            }
            match tokio::time::timeout(timeout, answers.next()).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => Err(BusError::Unavailable("the bus closed".to_owned())),
                Err(_) => Err(BusError::TimedOut),
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn max_payload(&self) -> usize {
        crate::LOCAL_MAX_PAYLOAD
    }
}
