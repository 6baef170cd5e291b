//! The messages that keep stack-wide state: which direct channels the gateways need LISTENed
//! (presence reports to the leader bridge), wspubsub topic ownership (claims to the leader),
//! and API-key checks (any bridge).
//!
//! The leader bridge holds the state in memory and rebuilds it after a failover from the
//! gateways' next presence reports (a report is a gateway's whole state, so applying one
//! twice changes nothing, and a gateway that stops reporting expires). Between whole
//! reports a gateway sends what changed since the version the leader holds, or a bare
//! heartbeat; a leader that does not hold that version asks for the whole state.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// How often a gateway reports its presence, in seconds, even when nothing changed.
pub const PRESENCE_INTERVAL_SECS: u64 = 5;

/// A gateway that has not reported for this many seconds is gone: its direct channels are
/// released and the topics it published lose their publisher.
pub const PRESENCE_EXPIRY_SECS: u64 = 3 * PRESENCE_INTERVAL_SECS;

/// A wspubsub topic: `/ws/pub/<apikey>/<domain>/<topic>`, `/ws/sub/<domain>/<topic>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Topic {
    /// The API key's domain.
    pub domain: String,
    /// The topic's name inside the domain.
    pub topic: String,
}

/// One gateway's whole state, as the leader needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Direct channels some socket of the gateway reads.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Topics a publisher socket of the gateway holds.
    #[serde(default)]
    pub published: Vec<Topic>,
    /// Topics some subscriber socket of the gateway is on.
    #[serde(default)]
    pub subscribed: Vec<Topic>,
    /// `/live` table topic classes some socket of the gateway reads.
    #[serde(default)]
    pub classes: Vec<crate::LiveClass>,
}

/// A request on [`crate::Subjects::registry`], answered by the leader bridge with a
/// [`RegistryReply`]. A gateway sends its requests one at a time, in order, so the leader sees
/// its reports and claims in the order the gateway made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryRequest {
    /// The gateway's instance id (random per process).
    pub gateway: String,
    /// What it asks.
    #[serde(flatten)]
    pub op: RegistryOp,
}

/// What a gateway asks of the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RegistryOp {
    /// The gateway's whole state (on every change, every [`PRESENCE_INTERVAL_SECS`], and when
    /// a new leader announced itself). Answered once its direct channels are LISTENed.
    Report {
        /// The state, or one part of it (see `part`).
        presence: Presence,
        /// Set when the state is too large for one message and comes in parts, in order:
        /// the leader applies the union of the parts when the last one arrives.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<ReportPart>,
        /// The state's version: later [`RegistryOp::Change`]s and [`RegistryOp::Alive`]s
        /// name it (a gateway without versions sends whole reports only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    /// What changed since the state of version `base` the leader holds: the new state is
    /// version `version`. Answered [`RegistryReply::Unknown`] when the leader does not hold
    /// `base` (a new leader, a lost message): the gateway then sends a whole report.
    Change {
        base: u64,
        version: u64,
        added: Presence,
        removed: Presence,
    },
    /// The heartbeat of a gateway whose state has not changed since version `version`.
    Alive { version: u64 },
    /// A publisher wants the topic (new, or taken over within the grace period).
    Claim {
        /// The topic.
        topic: Topic,
    },
    /// The gateway's publisher left the topic: the grace period starts.
    Release {
        /// The topic.
        topic: Topic,
    },
    /// Does the topic exist (a publisher holds it, or it is within its grace period)?
    Lookup {
        /// The topic.
        topic: Topic,
    },
}

/// Which part of a report in several parts this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportPart {
    /// The same for every part of one report, different for the next report.
    pub id: u64,
    /// 0 for the first part.
    pub index: u32,
    /// How many parts the report has (at most [`MAX_REPORT_PARTS`]).
    pub count: u32,
}

/// The parts of a state being split ([`Presence::split`]).
struct Parts {
    budget: usize,
    /// What the last part takes so far, in bytes of JSON.
    used: usize,
    done: Vec<Presence>,
}

impl Parts {
    /// The empty state's JSON and the request around it.
    const FRAME: usize = 256;

    /// Adds `items` to the list `list` picks of a part, opening a new part when the last one
    /// is full (one item larger than a part makes a part of its own).
    fn add<T: Serialize>(&mut self, items: Vec<T>, list: fn(&mut Presence) -> &mut Vec<T>) {
        for item in items {
            let n = serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
            if self.used + n > self.budget && self.used > Self::FRAME {
                self.done.push(Presence::default());
                self.used = Self::FRAME;
            }
            self.used += n;
            if let Some(last) = self.done.last_mut() {
                list(last).push(item);
            }
        }
    }
}

/// Most parts of one report: a gateway fills three quarters of the server's `max_payload` a
/// part (about 768 KiB by default, 11 KiB with a 16 KiB limit), so that is 3 GiB of state by
/// default, far more than any one gateway's sockets can hold.
pub const MAX_REPORT_PARTS: u32 = 4096;

impl Presence {
    /// The state as parts whose JSON each takes at most about `budget` bytes (one item
    /// larger than that makes a part of its own). One part, `self`, when it fits.
    pub fn split(self, budget: usize) -> Vec<Presence> {
        let mut parts = Parts {
            budget,
            used: Parts::FRAME,
            done: vec![Presence::default()],
        };
        parts.add(self.channels, |p| &mut p.channels);
        parts.add(self.published, |p| &mut p.published);
        parts.add(self.subscribed, |p| &mut p.subscribed);
        parts.add(self.classes, |p| &mut p.classes);
        parts.done
    }

    /// Adds the items of `part` (the leader joining a report's parts).
    pub fn merge(&mut self, part: Presence) {
        self.channels.extend(part.channels);
        self.published.extend(part.published);
        self.subscribed.extend(part.subscribed);
        self.classes.extend(part.classes);
    }

    /// What `new` adds to `old` and what it removes (each list sorted).
    pub fn diff(old: &Presence, new: &Presence) -> (Presence, Presence) {
        fn sides<T: Ord + Clone>(old: &[T], new: &[T]) -> (Vec<T>, Vec<T>) {
            let (o, n): (BTreeSet<&T>, BTreeSet<&T>) = (old.iter().collect(), new.iter().collect());
            (
                n.difference(&o).map(|t| (*t).clone()).collect(),
                o.difference(&n).map(|t| (*t).clone()).collect(),
            )
        }
        let (channels, gone_channels) = sides(&old.channels, &new.channels);
        let (published, gone_published) = sides(&old.published, &new.published);
        let (subscribed, gone_subscribed) = sides(&old.subscribed, &new.subscribed);
        let (classes, gone_classes) = sides(&old.classes, &new.classes);
        (
            Presence {
                channels,
                published,
                subscribed,
                classes,
            },
            Presence {
                channels: gone_channels,
                published: gone_published,
                subscribed: gone_subscribed,
                classes: gone_classes,
            },
        )
    }

    /// This state with `added` and without `removed` (each list sorted, without repeats).
    pub fn changed(&self, added: Presence, removed: &Presence) -> Presence {
        fn side<T: Ord + Clone>(now: &[T], added: Vec<T>, removed: &[T]) -> Vec<T> {
            let gone: BTreeSet<&T> = removed.iter().collect();
            let mut all: BTreeSet<T> = now.iter().filter(|t| !gone.contains(t)).cloned().collect();
            all.extend(added);
            all.into_iter().collect()
        }
        Presence {
            channels: side(&self.channels, added.channels, &removed.channels),
            published: side(&self.published, added.published, &removed.published),
            subscribed: side(&self.subscribed, added.subscribed, &removed.subscribed),
            classes: side(&self.classes, added.classes, &removed.classes),
        }
    }
}

/// The leader's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryReply {
    /// Applied; claim granted (to this gateway); the topic exists (lookup).
    Ok,
    /// Another gateway's publisher holds the topic.
    Taken,
    /// No such topic.
    Absent,
    /// A leader that just took over does not know the stack's topics yet: ask again shortly.
    Retry,
    /// The leader does not hold the gateway's state at the version named: send it whole.
    Unknown,
}

/// Body of a request on [`crate::Subjects::apikey`]: may this key publish in this domain?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCheck {
    /// The publisher's API key.
    pub apikey: String,
    /// The domain of the topic.
    pub domain: String,
}

/// A bridge's answer to a [`KeyCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The key is active for the domain.
    pub ok: bool,
    /// Set when the bridge could not answer (database down): not a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Ack {
    /// A yes (or no) answer.
    pub fn answer(ok: bool) -> Self {
        Self { ok, error: None }
    }

    /// The bridge could not answer.
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_requests_are_tagged() {
        let claim = RegistryRequest {
            gateway: "g".into(),
            op: RegistryOp::Claim {
                topic: Topic {
                    domain: "d".into(),
                    topic: "t".into(),
                },
            },
        };
        let json = serde_json::to_string(&claim).expect("encodes");
        assert_eq!(
            json,
            r#"{"gateway":"g","op":"claim","topic":{"domain":"d","topic":"t"}}"#
        );
        assert_eq!(
            serde_json::from_str::<RegistryRequest>(&json).expect("decodes"),
            claim
        );
        assert_eq!(
            serde_json::to_string(&RegistryReply::Taken).expect("encodes"),
            r#""taken""#
        );
        let r: RegistryRequest =
            serde_json::from_str(r#"{"gateway":"g","op":"report","presence":{}}"#)
                .expect("decodes");
        assert_eq!(
            r.op,
            RegistryOp::Report {
                presence: Presence::default(),
                part: None,
                version: None,
            }
        );
    }

    #[test]
    fn a_large_state_splits_into_parts_that_join_again() {
        let topic = |i: usize| Topic {
            domain: "d".into(),
            topic: format!("{i:0>120}"),
        };
        let whole = Presence {
            channels: (0..300).map(|i| format!("channel-{i}")).collect(),
            published: (0..500).map(topic).collect(),
            subscribed: (500..900).map(topic).collect(),
            classes: Vec::new(),
        };
        let budget = 16 << 10;
        let parts = whole.clone().split(budget);
        assert!(parts.len() > 5, "{} parts", parts.len());
        let mut joined = Presence::default();
        for part in parts {
            let request = RegistryRequest {
                gateway: "g".into(),
                op: RegistryOp::Report {
                    presence: part.clone(),
                    part: Some(ReportPart {
                        id: 1,
                        index: 0,
                        count: 1,
                    }),
                    version: Some(1),
                },
            };
            let len = serde_json::to_vec(&request).expect("encodes").len();
            assert!(len <= budget, "a part of {len} bytes");
            joined.merge(part);
        }
        assert_eq!(joined, whole);
        assert_eq!(Presence::default().split(budget), vec![Presence::default()]);
    }

    #[test]
    fn a_change_applied_to_the_old_state_gives_the_new_one() {
        let p = |channels: &[&str], classes: &[&str]| Presence {
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            classes: classes
                .iter()
                .map(|c| crate::LiveClass {
                    topic: "t".into(),
                    role: "r".into(),
                    claims: (*c).to_owned(),
                    all: false,
                    route: None,
                })
                .collect(),
            ..Presence::default()
        };
        let old = p(&["a", "b"], &["x", "y"]);
        let new = p(&["b", "c"], &["y", "z"]);
        let (added, removed) = Presence::diff(&old, &new);
        assert_eq!(added, p(&["c"], &["z"]));
        assert_eq!(removed, p(&["a"], &["x"]));
        assert_eq!(old.changed(added, &removed), new);
        let (none, gone) = Presence::diff(&new, &new);
        assert_eq!((none, gone), (Presence::default(), Presence::default()));
    }

    #[test]
    fn a_hundred_thousand_routed_classes_fit_in_the_parts_a_leader_takes() {
        // A gateway's most classes (each user its own, routed by its `sub`), at NATS's default
        // message limit of 1 MiB less the room the gateway leaves.
        let class = |i: usize| crate::LiveClass {
            topic: "orders".into(),
            role: "web_user".into(),
            claims: format!(r#"{{"sub":"user-{i:0>8}"}}"#),
            all: false,
            route: Some(crate::LiveRoute {
                column: "owner".into(),
                value: Some(format!("user-{i:0>8}")),
            }),
        };
        let whole = Presence {
            classes: (0..100_000).map(class).collect(),
            ..Presence::default()
        };
        let bytes = serde_json::to_vec(&whole).expect("encodes").len();
        let parts = whole.clone().split(((1 << 20) - 1024) * 3 / 4);
        assert!(
            parts.len() as u32 <= MAX_REPORT_PARTS,
            "{} parts",
            parts.len()
        );
        let mut joined = Presence::default();
        for part in parts {
            joined.merge(part);
        }
        assert_eq!(joined, whole);
        assert!(bytes < 20 << 20, "{bytes} bytes");
    }
}
