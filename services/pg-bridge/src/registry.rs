//! The stack-wide state the leader keeps, without I/O: which direct channels some gateway
//! needs (reference-counted by gateway, so the leader LISTENs exactly while one uses a
//! channel), who publishes each wspubsub topic, and which `/live` table classes some gateway's
//! sockets read (the capture serves their union).
//!
//! A report is input from the bus, not trusted: a channel it names is LISTENed only when it is
//! a valid name and one of this bridge's `PGWS_DIRECT_CHANNELS`, so whoever holds a gateway's
//! NATS credentials cannot make the leader LISTEN on (and publish) any other channel.
//!
//! Each gateway reports its whole state ([`Presence`]), so a report replaces what the gateway
//! said before and applying it twice changes nothing; a gateway silent for
//! [`PRESENCE_EXPIRY_SECS`] is dropped. A topic whose publisher left (released, or its gateway
//! expired) is an orphan for the grace period: a new publisher may take it over, its
//! subscribers stay; after that it is closed. A leader that just took over knows nothing until
//! the gateways report again, so for [`Registry::settle`] it answers `Retry` where an answer
//! would depend on what it does not know yet.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use pgws_config::DirectChannels;
use pgws_proto::{
    valid_channel, LiveClass, Presence, RegistryReply, ReportPart, Topic, MAX_REPORT_PARTS,
    PRESENCE_EXPIRY_SECS, PRESENCE_INTERVAL_SECS,
};
use tokio::time::Instant;

/// What a new leader waits for before answering from its own knowledge: one presence period
/// and a margin, by which every live gateway has reported.
pub(crate) fn settle() -> Duration {
    Duration::from_secs(PRESENCE_INTERVAL_SECS + 1)
}

/// What the leader must do after a change of the registry.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Channels that now have their first gateway: `LISTEN`.
    pub(crate) listen: Vec<String>,
    /// Channels that lost their last gateway: `UNLISTEN`.
    pub(crate) unlisten: Vec<String>,
    /// Orphan topics whose grace period ended: close their subscribers.
    pub(crate) closed: Vec<Topic>,
    /// Channels a gateway reported for the first time that are not direct channels here:
    /// not LISTENed.
    pub(crate) refused: Vec<String>,
}

impl Changes {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.listen.is_empty()
            && self.unlisten.is_empty()
            && self.closed.is_empty()
            && self.refused.is_empty()
    }
}

#[derive(Debug)]
struct GatewayState {
    channels: HashSet<String>,
    /// Channels it reports that are not direct channels here.
    refused: HashSet<String>,
    /// `/live` table classes its sockets read.
    classes: BTreeSet<LiveClass>,
    /// Its whole state as last applied, with the version the gateway gave it: the base of
    /// its next change.
    last: Option<(u64, Presence)>,
    seen: Instant,
}

/// A report in parts, joined as they arrive.
#[derive(Debug)]
struct Parts {
    id: u64,
    /// The index expected next.
    next: u32,
    joined: Presence,
    seen: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Publisher(String),
    Orphan { until: Instant },
}

/// The leader's registry.
#[derive(Debug)]
pub(crate) struct Registry {
    gateways: HashMap<String, GatewayState>,
    /// Reports in parts not yet whole, by gateway.
    parts: HashMap<String, Parts>,
    /// For each direct channel, how many gateways need it.
    refs: HashMap<String, usize>,
    topics: HashMap<Topic, Holder>,
    /// Topics closed recently, and when: subscribers a gateway still reports on them are
    /// being closed, not missed.
    closed: HashMap<Topic, Instant>,
    grace: Duration,
    /// The channels a gateway may have LISTENed (`PGWS_DIRECT_CHANNELS`).
    direct: DirectChannels,
    /// Until then, answers that depend on the whole stack's state are `Retry`.
    settled_at: Instant,
    /// How long a table class or a direct channel nobody reads any more is still served
    /// ([`Registry::with_linger`]), and the classes and channels doing so, until when.
    linger: Duration,
    lingering: BTreeMap<LiveClass, Instant>,
    lingering_channels: HashMap<String, Instant>,
}

/// Most classes served after their last reader left; beyond, the oldest go first.
const MAX_LINGERING: usize = 100_000;

/// Most direct channels LISTENed after their last reader left; beyond, the oldest are
/// UNLISTENed first. Lower than the classes' bound: PostgreSQL checks a notification against
/// its session's LISTEN list one by one, and with `PGWS_DIRECT_CHANNELS=*` any token holder
/// names channels.
const MAX_LINGERING_CHANNELS: usize = 10_000;

impl Registry {
    /// An empty registry of a leader that took over at `now`, which LISTENs on the `direct`
    /// channels gateways report and no others.
    pub(crate) fn new(grace: Duration, direct: DirectChannels, now: Instant) -> Self {
        Self {
            gateways: HashMap::new(),
            parts: HashMap::new(),
            refs: HashMap::new(),
            topics: HashMap::new(),
            closed: HashMap::new(),
            grace,
            direct,
            settled_at: now + settle(),
            linger: Duration::ZERO,
            lingering: BTreeMap::new(),
            lingering_channels: HashMap::new(),
        }
    }

    /// The same registry, keeping a table class captured and a direct channel LISTENed for
    /// `linger` after their last reader left: with a history, what they carry goes on being
    /// kept for a socket that comes back and resumes.
    pub(crate) fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// `classes`, which some gateway no longer reads, linger if no other gateway reads them.
    fn linger(&mut self, classes: impl IntoIterator<Item = LiveClass>, now: Instant) {
        if self.linger.is_zero() {
            return;
        }
        let until = now + self.linger;
        for class in classes {
            if !self.gateways.values().any(|g| g.classes.contains(&class)) {
                self.lingering.insert(class, until);
            }
        }
        while self.lingering.len() > MAX_LINGERING {
            let oldest = self
                .lingering
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(c, _)| c.clone());
            match oldest {
                Some(c) => self.lingering.remove(&c),
                None => break,
            };
        }
    }

    /// Answers from its own knowledge from now on: no earlier leader knew of a topic
    /// ([`crate::standing`]), so none can be missing.
    pub(crate) fn settle_now(&mut self, now: Instant) {
        self.settled_at = now;
    }

    /// Until when answers that depend on the whole stack's state are `Retry`.
    pub(crate) fn settled_at(&self) -> Instant {
        self.settled_at
    }

    /// Whether it knows of a topic (held, or an orphan within its grace period).
    pub(crate) fn has_topics(&self) -> bool {
        !self.topics.is_empty()
    }

    /// The direct channels to LISTEN on.
    pub(crate) fn channels(&self) -> impl Iterator<Item = &str> {
        self.refs
            .keys()
            .chain(self.lingering_channels.keys())
            .map(String::as_str)
    }

    /// Whether `channel` is a direct channel some gateway needs.
    pub(crate) fn is_listened(&self, channel: &str) -> bool {
        self.refs.contains_key(channel) || self.lingering_channels.contains_key(channel)
    }

    /// Replaces the state of `gateway` with `presence`.
    pub(crate) fn report(&mut self, gateway: &str, presence: Presence, now: Instant) -> Changes {
        let mut changes = Changes::default();
        let (wanted, refused): (HashSet<String>, HashSet<String>) = presence
            .channels
            .into_iter()
            .filter(|c| valid_channel(c))
            .partition(|c| self.direct.contains(c));
        let state = self
            .gateways
            .entry(gateway.to_owned())
            .or_insert_with(|| GatewayState {
                channels: HashSet::new(),
                refused: HashSet::new(),
                classes: BTreeSet::new(),
                last: None,
                seen: now,
            });
        state.seen = now;
        // A whole state without a version: no change can build on it.
        state.last = None;
        changes.refused = refused.difference(&state.refused).cloned().collect();
        state.refused = refused;
        let classes: BTreeSet<LiveClass> = presence.classes.into_iter().collect();
        let left: Vec<LiveClass> = state.classes.difference(&classes).cloned().collect();
        state.classes = classes;
        let added: Vec<String> = wanted.difference(&state.channels).cloned().collect();
        let removed: Vec<String> = state.channels.difference(&wanted).cloned().collect();
        state.channels = wanted;
        for c in added {
            self.hold(c, &mut changes);
        }
        for c in removed {
            self.drop_ref(&c, &mut changes, now);
        }
        let published: HashSet<&Topic> = presence.published.iter().collect();
        for topic in &presence.published {
            match self.topics.get(topic) {
                Some(Holder::Publisher(owner)) if owner != gateway => {
                    tracing::warn!(
                        domain = %topic.domain,
                        topic = %topic.topic,
                        "two gateways report the same publisher topic; the first keeps it"
                    );
                }
                _ => {
                    self.topics
                        .insert(topic.clone(), Holder::Publisher(gateway.to_owned()));
                }
            }
        }
        // Topics this gateway held and no longer reports lost their publisher.
        let until = now + self.grace;
        for (topic, holder) in &mut self.topics {
            if matches!(holder, Holder::Publisher(owner) if owner == gateway)
                && !published.contains(topic)
            {
                *holder = Holder::Orphan { until };
            }
        }
        // Subscribers on a topic nobody knows (its close was missed, or this leader is new):
        // an orphan, closed after the grace period unless a publisher comes.
        if now >= self.settled_at {
            for topic in presence.subscribed {
                if !self.closed.contains_key(&topic) {
                    self.topics.entry(topic).or_insert(Holder::Orphan { until });
                }
            }
        }
        self.linger(left, now);
        changes
    }

    /// One part of a report too large for one message. The parts come in order; the last
    /// one applies their union as [`Registry::report`] does (`Ok(Some(changes))`), earlier
    /// ones are kept (`Ok(None)`). `Err` for a part out of order or out of bounds: the
    /// report is dropped, and the gateway sends it again.
    pub(crate) fn report_part(
        &mut self,
        gateway: &str,
        part: ReportPart,
        presence: Presence,
        version: Option<u64>,
        now: Instant,
    ) -> Result<Option<Changes>, String> {
        self.touch(gateway, now);
        if part.count == 0 || part.count > MAX_REPORT_PARTS || part.index >= part.count {
            self.parts.remove(gateway);
            return Err(format!("part {} of {}", part.index, part.count));
        }
        if part.index == 0 {
            self.parts.insert(
                gateway.to_owned(),
                Parts {
                    id: part.id,
                    next: 0,
                    joined: Presence::default(),
                    seen: now,
                },
            );
        }
        let Some(parts) = self
            .parts
            .get_mut(gateway)
            .filter(|p| p.id == part.id && p.next == part.index)
        else {
            self.parts.remove(gateway);
            return Err(format!("part {} out of order", part.index));
        };
        parts.joined.merge(presence);
        parts.next += 1;
        parts.seen = now;
        if parts.next < part.count {
            return Ok(None);
        }
        let whole = self
            .parts
            .remove(gateway)
            .map(|p| p.joined)
            .unwrap_or_default();
        Ok(Some(self.report_version(gateway, whole, version, now)))
    }

    /// [`Registry::report`], keeping the state as version `version` (when the gateway gives
    /// versions) for its later changes and heartbeats.
    pub(crate) fn report_version(
        &mut self,
        gateway: &str,
        presence: Presence,
        version: Option<u64>,
        now: Instant,
    ) -> Changes {
        let kept = version.map(|v| (v, presence.clone()));
        let changes = self.report(gateway, presence, now);
        if let Some(state) = self.gateways.get_mut(gateway) {
            state.last = kept;
        }
        changes
    }

    /// Applies a gateway's change to its state of version `base`, making it version
    /// `version`; `None` when this leader does not hold that state (it asks for a whole
    /// report).
    pub(crate) fn change(
        &mut self,
        gateway: &str,
        (base, version): (u64, u64),
        added: Presence,
        removed: &Presence,
        now: Instant,
    ) -> Option<Changes> {
        let (held, last) = self.gateways.get(gateway)?.last.as_ref()?;
        if *held != base {
            return None;
        }
        let next = last.changed(added, removed);
        Some(self.report_version(gateway, next, Some(version), now))
    }

    /// A gateway's heartbeat: true (and the gateway is fresh) when this leader holds its state
    /// at `version`.
    pub(crate) fn alive(&mut self, gateway: &str, version: u64, now: Instant) -> bool {
        let held = self
            .gateways
            .get(gateway)
            .and_then(|g| g.last.as_ref())
            .is_some_and(|(v, _)| *v == version);
        if held {
            self.touch(gateway, now);
        }
        held
    }

    /// The `/live` table classes some gateway reads, or that linger after their last reader
    /// left ([`Registry::with_class_linger`]), each once, sorted.
    pub(crate) fn classes(&self) -> Vec<LiveClass> {
        let all: BTreeSet<&LiveClass> = self
            .gateways
            .values()
            .flat_map(|g| &g.classes)
            .chain(self.lingering.keys())
            .collect();
        all.into_iter().cloned().collect()
    }

    /// A publisher on `gateway` wants `topic`.
    pub(crate) fn claim(&mut self, gateway: &str, topic: Topic, now: Instant) -> RegistryReply {
        self.touch(gateway, now);
        match self.topics.get(&topic) {
            Some(Holder::Publisher(owner)) if owner != gateway => RegistryReply::Taken,
            None if now < self.settled_at => RegistryReply::Retry,
            _ => {
                self.topics
                    .insert(topic, Holder::Publisher(gateway.to_owned()));
                RegistryReply::Ok
            }
        }
    }

    /// The publisher of `topic` on `gateway` left.
    pub(crate) fn release(&mut self, gateway: &str, topic: &Topic, now: Instant) -> RegistryReply {
        self.touch(gateway, now);
        if let Some(holder) = self.topics.get_mut(topic) {
            if matches!(holder, Holder::Publisher(owner) if owner == gateway) {
                *holder = Holder::Orphan {
                    until: now + self.grace,
                };
            }
        }
        RegistryReply::Ok
    }

    /// Whether `topic` exists.
    pub(crate) fn lookup(&self, topic: &Topic, now: Instant) -> RegistryReply {
        match self.topics.get(topic) {
            Some(_) => RegistryReply::Ok,
            None if now < self.settled_at => RegistryReply::Retry,
            None => RegistryReply::Absent,
        }
    }

    /// Drops gateways silent for too long and closes orphans whose grace period ended.
    pub(crate) fn expire(&mut self, now: Instant) -> Changes {
        let mut changes = Changes::default();
        let expiry = Duration::from_secs(PRESENCE_EXPIRY_SECS);
        let gone: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, g)| now.duration_since(g.seen) >= expiry)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            tracing::info!(gateway = %id, "gateway stopped reporting; its channels and topics are released");
            if let Some(state) = self.gateways.remove(&id) {
                for c in state.channels {
                    self.drop_ref(&c, &mut changes, now);
                }
                self.linger(state.classes, now);
            }
            let until = now + self.grace;
            for holder in self.topics.values_mut() {
                if matches!(holder, Holder::Publisher(owner) if *owner == id) {
                    *holder = Holder::Orphan { until };
                }
            }
        }
        self.parts
            .retain(|_, p| now.duration_since(p.seen) < expiry);
        self.lingering.retain(|_, until| *until > now);
        let over: Vec<String> = self
            .lingering_channels
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for c in over {
            self.lingering_channels.remove(&c);
            changes.unlisten.push(c);
        }
        let mut closed = Vec::new();
        self.topics.retain(|topic, holder| match holder {
            Holder::Orphan { until } if *until <= now => {
                closed.push(topic.clone());
                false
            }
            _ => true,
        });
        for topic in &closed {
            self.closed.insert(topic.clone(), now);
        }
        self.closed.retain(|_, at| now.duration_since(*at) < expiry);
        changes.closed = closed;
        changes
    }

    /// When [`Registry::expire`] next has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let expiry = Duration::from_secs(PRESENCE_EXPIRY_SECS);
        let gateways = self.gateways.values().map(|g| g.seen + expiry);
        let orphans = self.topics.values().filter_map(|h| match h {
            Holder::Orphan { until } => Some(*until),
            Holder::Publisher(_) => None,
        });
        let tombstones = self.closed.values().map(|at| *at + expiry);
        let lingering = self
            .lingering
            .values()
            .chain(self.lingering_channels.values())
            .copied();
        gateways
            .chain(orphans)
            .chain(tombstones)
            .chain(lingering)
            .min()
    }

    fn touch(&mut self, gateway: &str, now: Instant) {
        if let Some(g) = self.gateways.get_mut(gateway) {
            g.seen = now;
        }
    }

    fn hold(&mut self, channel: String, changes: &mut Changes) {
        let n = self.refs.entry(channel.clone()).or_insert(0);
        *n += 1;
        // A lingering channel is LISTENed still.
        if *n == 1 && self.lingering_channels.remove(&channel).is_none() {
            changes.listen.push(channel);
        }
    }

    fn drop_ref(&mut self, channel: &str, changes: &mut Changes, now: Instant) {
        if let Some(n) = self.refs.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(channel);
                if self.linger.is_zero() {
                    changes.unlisten.push(channel.to_owned());
                } else {
                    self.lingering_channels
                        .insert(channel.to_owned(), now + self.linger);
                    if self.lingering_channels.len() > MAX_LINGERING_CHANNELS {
                        let oldest = self
                            .lingering_channels
                            .iter()
                            .min_by_key(|(_, until)| **until)
                            .map(|(c, _)| c.clone());
                        if let Some(c) = oldest {
                            self.lingering_channels.remove(&c);
                            changes.unlisten.push(c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    fn topic(t: &str) -> Topic {
        Topic {
            domain: "d".into(),
            topic: t.into(),
        }
    }

    /// A class of the `orders` table topic for `role`.
    fn class(role: &str) -> LiveClass {
        LiveClass {
            topic: "orders".into(),
            role: role.into(),
            claims: "{}".into(),
            all: false,
            route: None,
        }
    }

    /// A report of these classes only.
    fn with(classes: Vec<LiveClass>) -> Presence {
        Presence {
            classes,
            ..Presence::default()
        }
    }

    fn presence(channels: &[&str], published: &[&str], subscribed: &[&str]) -> Presence {
        Presence {
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            published: published.iter().map(|t| topic(t)).collect(),
            subscribed: subscribed.iter().map(|t| topic(t)).collect(),
            classes: Vec::new(),
        }
    }

    #[test]
    fn direct_channels_linger_after_their_last_reader_when_asked() {
        let t0 = Instant::now();
        let mut r =
            Registry::new(GRACE, DirectChannels::All, t0).with_linger(Duration::from_secs(30));
        let c = r.report("g1", presence(&["a"], &[], &[]), t0);
        assert_eq!(c.listen, ["a"]);
        let c = r.report("g1", presence(&[], &[], &[]), t0);
        assert!(c.unlisten.is_empty(), "still LISTENed: {c:?}");
        assert!(r.is_listened("a"));
        // Read again meanwhile: no second LISTEN, and no UNLISTEN when its time would be over.
        let c = r.report(
            "g2",
            presence(&["a"], &[], &[]),
            t0 + Duration::from_secs(5),
        );
        assert!(c.listen.is_empty());
        let c = r.report("g2", presence(&[], &[], &[]), t0 + Duration::from_secs(6));
        assert!(c.unlisten.is_empty());
        let c = r.expire(t0 + Duration::from_secs(20));
        assert!(c.unlisten.is_empty());
        let c = r.expire(t0 + Duration::from_secs(37));
        assert_eq!(c.unlisten, ["a"]);
        assert!(!r.is_listened("a"));
    }

    #[test]
    fn classes_linger_after_their_last_reader_when_asked() {
        let t0 = Instant::now();
        let linger = Duration::from_secs(30);
        let mut r = Registry::new(GRACE, DirectChannels::All, t0).with_linger(linger);
        r.report("g1", with(vec![class("a"), class("b")]), t0);
        r.report("g2", with(vec![class("b")]), t0);
        r.report("g1", with(vec![]), t0 + Duration::from_secs(1));
        assert_eq!(
            r.classes(),
            [class("a"), class("b")],
            "a lingers, b is read"
        );
        r.report("g2", with(vec![]), t0 + Duration::from_secs(2));
        assert_eq!(
            r.next_deadline()
                .map(|d| d <= t0 + linger + Duration::from_secs(2)),
            Some(true)
        );
        r.expire(t0 + Duration::from_secs(20));
        assert_eq!(r.classes(), [class("a"), class("b")]);
        r.expire(t0 + Duration::from_secs(31));
        assert_eq!(r.classes(), [class("b")], "a's time is over");
        r.expire(t0 + Duration::from_secs(33));
        assert!(r.classes().is_empty());
        // Without a linger a class goes with its last reader.
        let mut plain = Registry::new(GRACE, DirectChannels::All, t0);
        plain.report("g1", with(vec![class("a")]), t0);
        plain.report("g1", with(vec![]), t0);
        assert!(plain.classes().is_empty());
    }

    #[test]
    fn classes_are_the_union_of_the_gateways_and_expire_with_them() {
        let (mut r, now) = settled();
        r.report("g1", with(vec![class("a"), class("b")]), now);
        r.report("g2", with(vec![class("b")]), now + Duration::from_secs(10));
        assert_eq!(r.classes(), [class("a"), class("b")]);
        r.report("g1", with(vec![]), now + Duration::from_secs(10));
        assert_eq!(r.classes(), [class("b")]);
        r.expire(now + Duration::from_secs(10 + PRESENCE_EXPIRY_SECS));
        assert!(r.classes().is_empty());
    }

    fn settled() -> (Registry, Instant) {
        let t0 = Instant::now();
        (Registry::new(GRACE, DirectChannels::All, t0), t0 + settle())
    }

    #[test]
    fn channels_are_counted_by_gateway() {
        let (mut r, now) = settled();
        let c = r.report("g1", presence(&["a", "b"], &[], &[]), now);
        let mut listen = c.listen.clone();
        listen.sort();
        assert_eq!(listen, vec!["a", "b"]);
        assert!(r.report("g2", presence(&["a"], &[], &[]), now).is_empty());
        // Reporting the same state again changes nothing.
        assert!(r.report("g2", presence(&["a"], &[], &[]), now).is_empty());
        let c = r.report("g1", presence(&[], &[], &[]), now);
        assert_eq!(c.unlisten, vec!["b"]);
        let c = r.report("g2", presence(&[], &[], &[]), now);
        assert_eq!(c.unlisten, vec!["a"]);
        assert_eq!(r.channels().count(), 0);
    }

    #[test]
    fn changes_and_heartbeats_apply_to_the_version_held_only() {
        let (mut r, now) = settled();
        assert!(!r.alive("g", 1, now), "nothing held yet");
        assert!(r
            .change(
                "g",
                (1, 2),
                presence(&["b"], &[], &[]),
                &Presence::default(),
                now
            )
            .is_none());
        let c = r.report_version("g", presence(&["a"], &[], &[]), Some(1), now);
        assert_eq!(c.listen, ["a"]);
        assert!(r.alive("g", 1, now));
        // A change of version 1 adds b and removes a: version 2.
        let c = r
            .change(
                "g",
                (1, 2),
                presence(&["b"], &[], &[]),
                &presence(&["a"], &[], &[]),
                now,
            )
            .expect("applied");
        assert_eq!(
            (c.listen, c.unlisten),
            (vec!["b".to_owned()], vec!["a".to_owned()])
        );
        assert!(!r.alive("g", 1, now) && r.alive("g", 2, now));
        // A change from a version no longer held (lost, or sent to another leader) is refused,
        // and changes nothing.
        assert!(r
            .change(
                "g",
                (1, 3),
                presence(&["c"], &[], &[]),
                &Presence::default(),
                now
            )
            .is_none());
        assert!(r.is_listened("b") && !r.is_listened("c"));
        // A whole report without a version: nothing is held for changes.
        r.report("g", presence(&["b"], &[], &[]), now);
        assert!(!r.alive("g", 2, now));
    }

    #[test]
    fn a_report_in_parts_applies_when_whole() {
        let (mut r, now) = settled();
        let part = |id, index, count| ReportPart { id, index, count };
        let p = |c: &str| presence(&[c], &[], &[]);
        assert_eq!(
            r.report_part("g", part(1, 0, 3), p("a"), None, now),
            Ok(None)
        );
        assert_eq!(
            r.report_part("g", part(1, 1, 3), p("b"), None, now),
            Ok(None)
        );
        assert!(!r.is_listened("a"), "nothing applies before the last part");
        let changes = r.report_part("g", part(1, 2, 3), p("c"), None, now);
        let mut listen = changes.expect("in order").expect("whole").listen;
        listen.sort();
        assert_eq!(listen, ["a", "b", "c"]);
        // A part missing or out of bounds drops the report; the next one starts afresh.
        assert_eq!(
            r.report_part("g", part(2, 0, 2), p("x"), None, now),
            Ok(None)
        );
        assert!(r
            .report_part("g", part(3, 1, 2), p("y"), None, now)
            .is_err());
        assert!(r
            .report_part("g", part(2, 1, 2), p("y"), None, now)
            .is_err());
        assert!(r
            .report_part("g", part(4, 0, MAX_REPORT_PARTS + 1), p("y"), None, now)
            .is_err());
        assert!(r.is_listened("a") && !r.is_listened("x"));
        // One part alone is a whole report.
        let c = r.report_part("g", part(5, 0, 1), p("z"), None, now);
        assert_eq!(c.expect("ok").expect("whole").listen, ["z"]);
        assert!(!r.is_listened("a"));
    }

    #[test]
    fn invalid_channel_names_are_ignored() {
        let (mut r, now) = settled();
        let long = "x".repeat(64);
        let c = r.report("g", presence(&["", &long, "a\0b", "ok"], &[], &[]), now);
        assert_eq!(c.listen, vec!["ok"]);
    }

    #[test]
    fn only_this_bridges_direct_channels_are_listened() {
        let t0 = Instant::now();
        let mut r = Registry::new(GRACE, DirectChannels::parse("chat,news"), t0);
        let c = r.report("g", presence(&["chat", "secrets", "payroll"], &[], &[]), t0);
        assert_eq!(c.listen, vec!["chat"]);
        let mut refused = c.refused.clone();
        refused.sort();
        assert_eq!(refused, vec!["payroll", "secrets"]);
        assert!(!r.is_listened("secrets"));
        // Refused once per gateway: the next report of the same channels changes nothing.
        assert!(r
            .report("g", presence(&["chat", "secrets", "payroll"], &[], &[]), t0)
            .is_empty());
        let c = r.report("g", presence(&["news", "secrets"], &[], &[]), t0);
        assert_eq!(
            (c.listen, c.unlisten, c.refused),
            (vec!["news".to_owned()], vec!["chat".to_owned()], vec![])
        );
        let mut none = Registry::new(GRACE, DirectChannels::None, t0);
        let c = none.report("g", presence(&["chat"], &[], &[]), t0);
        assert!(c.listen.is_empty() && c.refused == ["chat"]);
    }

    #[test]
    fn a_silent_gateway_expires() {
        let (mut r, now) = settled();
        r.report("g1", presence(&["a"], &["t"], &[]), now);
        r.report("g2", presence(&["a"], &[], &[]), now);
        let later = now + Duration::from_secs(PRESENCE_EXPIRY_SECS - 1);
        r.report("g2", presence(&["a"], &[], &[]), later);
        let c = r.expire(now + Duration::from_secs(PRESENCE_EXPIRY_SECS));
        assert!(c.is_empty(), "g2 still needs a: {c:?}");
        // g1's topic is an orphan: it still exists, another gateway may take it.
        assert_eq!(r.lookup(&topic("t"), later), RegistryReply::Ok);
        let c = r.expire(later + Duration::from_secs(PRESENCE_EXPIRY_SECS));
        assert_eq!(c.unlisten, vec!["a"]);
    }

    #[test]
    fn one_publisher_per_topic_and_takeover_within_grace() {
        let (mut r, now) = settled();
        assert_eq!(r.claim("g1", topic("t"), now), RegistryReply::Ok);
        assert_eq!(r.claim("g2", topic("t"), now), RegistryReply::Taken);
        assert_eq!(r.release("g2", &topic("t"), now), RegistryReply::Ok);
        assert_eq!(r.claim("g2", topic("t"), now), RegistryReply::Taken);
        r.release("g1", &topic("t"), now);
        assert_eq!(r.lookup(&topic("t"), now), RegistryReply::Ok);
        let within = now + GRACE - Duration::from_millis(1);
        assert!(r.expire(within).closed.is_empty());
        assert_eq!(r.claim("g2", topic("t"), within), RegistryReply::Ok);
        assert!(r.expire(now + GRACE * 2).closed.is_empty());
    }

    #[test]
    fn an_orphan_closes_after_the_grace_period() {
        let (mut r, now) = settled();
        r.claim("g1", topic("t"), now);
        r.release("g1", &topic("t"), now);
        assert_eq!(r.next_deadline(), Some(now + GRACE));
        assert_eq!(r.expire(now + GRACE).closed, vec![topic("t")]);
        assert_eq!(r.lookup(&topic("t"), now + GRACE), RegistryReply::Absent);
    }

    #[test]
    fn a_report_without_a_held_topic_releases_it() {
        let (mut r, now) = settled();
        r.report("g1", presence(&[], &["t"], &[]), now);
        assert_eq!(r.claim("g2", topic("t"), now), RegistryReply::Taken);
        r.report("g1", presence(&[], &[], &[]), now);
        assert_eq!(r.claim("g2", topic("t"), now), RegistryReply::Ok);
    }

    #[test]
    fn a_leader_with_nothing_to_learn_answers_at_once() {
        let t0 = Instant::now();
        let mut r = Registry::new(GRACE, DirectChannels::All, t0);
        r.settle_now(t0);
        assert!(!r.has_topics());
        assert_eq!(r.lookup(&topic("t"), t0), RegistryReply::Absent);
        assert_eq!(r.claim("g1", topic("t"), t0), RegistryReply::Ok);
        assert!(r.has_topics());
    }

    #[test]
    fn a_new_leader_asks_to_retry_until_it_knows_the_stack() {
        let t0 = Instant::now();
        let mut r = Registry::new(GRACE, DirectChannels::All, t0);
        assert_eq!(r.lookup(&topic("t"), t0), RegistryReply::Retry);
        assert_eq!(r.claim("g2", topic("t"), t0), RegistryReply::Retry);
        // A report rebuilds the publisher: known answers come at once.
        r.report("g1", presence(&[], &["t"], &[]), t0);
        assert_eq!(r.lookup(&topic("t"), t0), RegistryReply::Ok);
        assert_eq!(r.claim("g2", topic("t"), t0), RegistryReply::Taken);
        let later = t0 + settle();
        assert_eq!(r.lookup(&topic("u"), later), RegistryReply::Absent);
    }

    #[test]
    fn subscribers_of_an_unknown_topic_are_closed_after_the_grace_period() {
        let (mut r, now) = settled();
        r.report("g1", presence(&[], &[], &["t"]), now);
        assert_eq!(r.lookup(&topic("t"), now), RegistryReply::Ok);
        let closed_at = now + GRACE;
        assert_eq!(r.expire(closed_at).closed, vec![topic("t")]);
        // Its subscribers are being closed: reporting them does not bring the topic back...
        r.report("g1", presence(&[], &[], &["t"]), closed_at);
        assert_eq!(r.lookup(&topic("t"), closed_at), RegistryReply::Absent);
        // ...unless they are still there long after (the close was missed).
        let later = closed_at + Duration::from_secs(PRESENCE_EXPIRY_SECS);
        r.expire(later);
        r.report("g1", presence(&[], &[], &["t"]), later);
        assert_eq!(r.lookup(&topic("t"), later), RegistryReply::Ok);
        // A publisher may always open it again.
        let (mut r, now) = settled();
        r.claim("g1", topic("t"), now);
        r.release("g1", &topic("t"), now);
        r.expire(now + GRACE);
        assert_eq!(r.claim("g2", topic("t"), now + GRACE), RegistryReply::Ok);
    }
}
