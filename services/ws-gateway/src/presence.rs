//! This gateway's dealings with the leader bridge's registry: which direct channels its
//! sockets read (so the leader LISTENs on them), which wspubsub topics its publishers hold and
//! its subscribers read.
//!
//! One task talks to the leader, one request at a time, so the leader sees this gateway's
//! reports and claims in the order they were made. The leader learns the gateway's state
//! when a direct channel, topic or table class gets its first or loses its last local
//! socket, and every [`PRESENCE_INTERVAL_SECS`] (the leader forgets a gateway silent for
//! longer than `PRESENCE_EXPIRY_SECS`). The whole state goes once, with a version; after
//! that only what changed since the version the leader acknowledged (`Change`), and a bare
//! heartbeat (`Alive`) when nothing did. The whole state goes again when the leader does not
//! hold that version (`Unknown`: a new leader, a lost answer), when a new leader announces
//! itself (gap marker) or the NATS connection came back. A socket joining a direct channel
//! waits (bounded) until the change holding the channel was answered, that is until the
//! leader LISTENs on it.
//!
//! Bounds: commands wait in an unbounded queue, but each socket sends at most two per
//! registration (one when it registers, one when it leaves), so the queue is bounded by the
//! number of sockets; each request waits at most [`REQUEST_TIMEOUT`]. A report larger than
//! the server's message limit goes in parts ([`ReportPart`]) that the leader joins; every item
//! of it is bounded (a channel, a topic, a table class: `MAX_CLASS_CLAIMS`), and `/live`
//! sockets may hold at most [`MAX_CLASSES`] distinct table classes per gateway (checked when a
//! socket subscribes). A report the leader does not take is a warning and
//! `pgws_gateway_presence_failures_total`, and goes again at the next change or heartbeat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pgws_proto::{
    LiveClass, Presence as State, RegistryOp, RegistryReply, RegistryRequest, ReportPart, Subjects,
    Topic, PRESENCE_INTERVAL_SECS,
};
use pgws_service::prometheus_client::metrics::counter::Counter;
use pgws_service::Shutdown;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Most distinct `/live` table classes one gateway reports. Under a per-user policy routed by
/// value every user is a class of its own (about 200 bytes of a report, which goes in parts
/// of less than the server's message limit), so this bounds a gateway's reports to about
/// 20 MB, not the number of users a stack serves.
pub(crate) const MAX_CLASSES: usize = 100_000;

/// What a request answers when no leader bridge listens.
const NO_LEADER: &str = "no leader bridge";

/// The bytes a report's part may take of a NATS message of at most `max_payload` bytes
/// (the server's limit, 1 MiB by default): room is left for the subject and headers.
fn report_budget(max_payload: usize) -> usize {
    (max_payload.saturating_sub(1024) * 3 / 4).max(1024)
}

/// How long one request to the leader may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What a socket registered with the leader; forgotten when the socket ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Registration {
    /// A socket reads this direct channel.
    Direct(String),
    /// A publisher socket holds this topic.
    Published(Topic),
    /// A subscriber socket reads this topic.
    Subscribed(Topic),
    /// A `/live` socket reads this table topic class: resolves once the leader knows it.
    Class(LiveClass),
}

enum Command {
    Add(Registration, Option<oneshot::Sender<()>>),
    Remove(Registration),
    Ask(RegistryOp, oneshot::Sender<Result<RegistryReply, String>>),
    Resync,
}

/// The handle sockets use; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Presence {
    tx: mpsc::UnboundedSender<Command>,
    /// Distinct table classes registered (counted as registrations are made, before the task
    /// reports them).
    classes: Arc<Mutex<BTreeMap<LiveClass, usize>>>,
}

impl Presence {
    /// Starts the task on `shutdown`; it ends (telling the leader) at shutdown.
    pub(crate) fn start(
        client: pgws_bus::Client,
        subjects: &Subjects,
        gateway: String,
        failures: Counter,
        shutdown: &Shutdown,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            client,
            subject: subjects.registry(),
            gateway,
            failures,
            reports: 0,
            acked: None,
            channels: BTreeMap::new(),
            published: BTreeSet::new(),
            subscribed: BTreeMap::new(),
            classes: BTreeMap::new(),
        };
        shutdown.spawn(task.run(rx, shutdown.token.clone()));
        Self {
            tx,
            classes: Arc::default(),
        }
    }

    /// Counts a socket in `class` unless that makes more than [`MAX_CLASSES`] distinct ones;
    /// false when refused. Released by [`Presence::remove`] of the class.
    pub(crate) fn admit_class(&self, class: &LiveClass) -> bool {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        if !classes.contains_key(class) && classes.len() >= MAX_CLASSES {
            return false;
        }
        *classes.entry(class.clone()).or_insert(0) += 1;
        true
    }

    /// Registers `what`; for a direct channel, resolves once the leader LISTENs on it (or the
    /// leader did not answer in time).
    pub(crate) async fn add(&self, what: Registration) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Add(what, Some(done))).is_ok() {
            drop(wait.await);
        }
    }

    /// Forgets `what` (a socket ended).
    pub(crate) fn remove(&self, what: Registration) {
        if let Registration::Class(class) = &what {
            let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            count(&mut classes, class, false);
        }
        drop(self.tx.send(Command::Remove(what)));
    }

    /// Asks the leader a topic question; `Err` when no leader answered.
    pub(crate) async fn ask(&self, op: RegistryOp) -> Result<RegistryReply, String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Ask(op, done))
            .map_err(|_| "the gateway is shutting down".to_owned())?;
        wait.await
            .map_err(|_| "the gateway is shutting down".to_owned())?
    }

    /// Reports the state again now (a new leader, or NATS came back).
    pub(crate) fn resync(&self) {
        drop(self.tx.send(Command::Resync));
    }
}

struct Task {
    client: pgws_bus::Client,
    subject: String,
    gateway: String,
    /// Reports that failed.
    failures: Counter,
    /// Reports and changes sent: the id of a report in parts, and the versions of the state.
    reports: u64,
    /// The version of the state the leader acknowledged last, and that state.
    acked: Option<(u64, State)>,
    /// Local sockets per direct channel.
    channels: BTreeMap<String, usize>,
    published: BTreeSet<Topic>,
    /// Local subscriber sockets per topic.
    subscribed: BTreeMap<Topic, usize>,
    /// Local `/live` sockets per table class.
    classes: BTreeMap<LiveClass, usize>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>, token: CancellationToken) {
        let mut heartbeat = interval(Duration::from_secs(PRESENCE_INTERVAL_SECS));
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                _ = token.cancelled() => {
                    // Shutting down: the leader releases this gateway's channels and starts
                    // the grace period of its topics now, not after the presence expiry.
                    self.channels.clear();
                    self.published.clear();
                    self.subscribed.clear();
                    self.classes.clear();
                    self.sync().await;
                    return;
                }
                _ = heartbeat.tick() => {
                    self.sync().await;
                    continue;
                }
                command = rx.recv() => match command {
                    Some(c) => c,
                    None => return,
                },
            };
            // Everything already queued goes in one report.
            let mut commands = vec![first];
            while let Ok(c) = rx.try_recv() {
                commands.push(c);
            }
            let mut changed = false;
            let mut waiting = Vec::new();
            for command in commands {
                match command {
                    Command::Add(what, done) => {
                        changed |= self.apply(&what, true);
                        waiting.extend(done);
                    }
                    Command::Remove(what) => {
                        if let Registration::Published(topic) = what {
                            self.release(topic).await;
                            // The leader's copy of this gateway's state loses it too.
                            changed = true;
                        } else {
                            changed |= self.apply(&what, false);
                        }
                    }
                    Command::Ask(op, done) => {
                        let claim = match &op {
                            RegistryOp::Claim { topic } => Some(topic.clone()),
                            _ => None,
                        };
                        // The leader knows topics by gateway, not by socket: a second
                        // publisher of a topic this gateway holds is refused here.
                        if claim.as_ref().is_some_and(|t| self.published.contains(t)) {
                            drop(done.send(Ok(RegistryReply::Taken)));
                            continue;
                        }
                        let answer = self.request(op).await;
                        if let (Some(topic), Ok(RegistryReply::Ok)) = (claim, &answer) {
                            self.published.insert(topic.clone());
                            // The leader's copy of this gateway's state gains it too (the
                            // base of the next change).
                            changed = true;
                            if let Err(Ok(_)) = done.send(answer) {
                                // The handshake that asked is gone: nobody will release it.
                                self.release(topic).await;
                            }
                            continue;
                        }
                        drop(done.send(answer));
                    }
                    Command::Resync => {
                        // A new leader, or NATS came back: the whole state.
                        self.acked = None;
                        changed = true;
                    }
                }
            }
            if changed {
                self.sync().await;
            }
            for done in waiting {
                let _ = done.send(());
            }
        }
    }

    /// Updates the local counts; true when the leader must hear of it.
    fn apply(&mut self, what: &Registration, add: bool) -> bool {
        match what {
            Registration::Direct(channel) => count(&mut self.channels, channel, add),
            Registration::Subscribed(topic) => count(&mut self.subscribed, topic, add),
            Registration::Class(class) => count(&mut self.classes, class, add),
            Registration::Published(topic) => {
                if add {
                    self.published.insert(topic.clone())
                } else {
                    self.published.remove(topic)
                }
            }
        }
    }

    /// The state the leader must know.
    fn state(&self) -> State {
        State {
            channels: self.channels.keys().cloned().collect(),
            published: self.published.iter().cloned().collect(),
            subscribed: self.subscribed.keys().cloned().collect(),
            classes: self.classes.keys().cloned().collect(),
        }
    }

    /// Brings the leader up to date: a heartbeat (`Alive`) when nothing changed since the
    /// version it acknowledged, what changed (`Change`) when that fits one message, else (and
    /// when the leader does not hold that version: a new leader, a lost answer) the whole
    /// state. So a gateway with 100,000 classes sends them whole once, then only changes.
    async fn sync(&mut self) {
        let now = self.state();
        if let Some((version, last)) = self.acked.take() {
            let (op, next) = if last == now {
                (RegistryOp::Alive { version }, version)
            } else {
                let (added, removed) = State::diff(&last, &now);
                self.reports += 1;
                let next = self.reports;
                let op = RegistryOp::Change {
                    base: version,
                    version: next,
                    added,
                    removed,
                };
                (op, next)
            };
            if self.fits(&op) {
                match self.request(op).await {
                    Ok(RegistryReply::Ok) => {
                        self.acked = Some((next, now));
                        return;
                    }
                    Err(e) if e == NO_LEADER => {
                        tracing::debug!("presence: no leader bridge");
                        return;
                    }
                    // Unknown, or no answer: the whole state.
                    _ => {}
                }
            }
        }
        self.report(now).await;
    }

    /// Whether a request fits one NATS message of the server's.
    fn fits(&self, op: &RegistryOp) -> bool {
        let budget = report_budget(self.client.max_payload());
        serde_json::to_vec(op).is_ok_and(|b| b.len() <= budget)
    }

    /// Sends the whole state, in parts when it does not fit in one NATS message. A report
    /// the leader does not take is logged and counted, and sent again at the next change or
    /// heartbeat.
    async fn report(&mut self, presence: State) {
        self.reports += 1;
        let budget = report_budget(self.client.max_payload());
        let parts = presence.clone().split(budget);
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        let id = self.reports;
        for (index, part_state) in (0..).zip(parts) {
            let part = (count > 1).then_some(ReportPart { id, index, count });
            let op = RegistryOp::Report {
                presence: part_state,
                part,
                version: Some(id),
            };
            match self.request(op).await {
                Ok(RegistryReply::Ok) => {}
                Ok(other) => return self.failed(&format!("the leader answered {other:?}")),
                // No leader at all: a new one announces itself and asks for reports.
                Err(e) if e == NO_LEADER => {
                    tracing::debug!("presence report: no leader bridge");
                    return;
                }
                Err(e) => return self.failed(&e),
            }
        }
        self.acked = Some((id, presence));
    }

    /// The publisher of `topic` on this gateway is gone. Not in the next report either: a
    /// lost release is still a release.
    async fn release(&mut self, topic: Topic) {
        self.published.remove(&topic);
        if let Err(e) = self.request(RegistryOp::Release { topic }).await {
            tracing::debug!(error = e, "topic release not confirmed");
        }
    }

    fn failed(&self, why: &str) {
        self.failures.inc();
        tracing::warn!(
            why,
            "presence report not taken by the leader bridge; sending it again at the next change or heartbeat"
        );
    }

    async fn request(&self, op: RegistryOp) -> Result<RegistryReply, String> {
        let request = RegistryRequest {
            gateway: self.gateway.clone(),
            op,
        };
        let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        let sent = self.client.request(self.subject.clone(), Bytes::from(body));
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, sent)
            .await
            .map_err(|_| "the leader bridge did not answer".to_owned())?
            .map_err(|e| match e {
                pgws_bus::BusError::NoResponders => NO_LEADER.to_owned(),
                e => e.to_string(),
            })?;
        serde_json::from_slice(&answer.payload).map_err(|e| format!("unreadable answer: {e}"))
    }
}

/// Counts a local socket in or out of `key`; true when `key` appeared or disappeared.
fn count<K: Ord + Clone>(map: &mut BTreeMap<K, usize>, key: &K, add: bool) -> bool {
    if add {
        let n = map.entry(key.clone()).or_insert(0);
        *n += 1;
        *n == 1
    } else {
        match map.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                map.remove(key);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_change_only_at_the_first_and_last_socket() {
        let mut m = BTreeMap::new();
        assert!(count(&mut m, &"a", true));
        assert!(!count(&mut m, &"a", true));
        assert!(!count(&mut m, &"a", false));
        assert!(count(&mut m, &"a", false));
        assert!(!count(&mut m, &"a", false));
        assert!(m.is_empty());
    }

    #[test]
    fn distinct_table_classes_are_bounded_per_gateway() {
        let presence = Presence {
            tx: mpsc::unbounded_channel().0,
            classes: Arc::default(),
        };
        let class = |n: usize| LiveClass {
            topic: "orders".into(),
            role: "web".into(),
            claims: format!(r#"{{"sub":"u{n}"}}"#),
            all: false,
            route: None,
        };
        for n in 0..MAX_CLASSES {
            assert!(presence.admit_class(&class(n)));
        }
        assert!(
            !presence.admit_class(&class(MAX_CLASSES)),
            "one class too many"
        );
        assert!(
            presence.admit_class(&class(0)),
            "a known class takes another socket"
        );
        presence.remove(Registration::Class(class(1)));
        assert!(
            presence.admit_class(&class(MAX_CLASSES)),
            "a class freed makes room"
        );
    }
}
