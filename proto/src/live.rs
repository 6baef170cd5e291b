//! `/live` (Daptin's websocket API): custom topics, kept by the bridges.
//!
//! A gateway holds no database credentials, so it asks the bridges (queue group
//! `<prefix>.bridge` on [`crate::Subjects::live_topics`]) to create, destroy, find and list
//! custom topics, which live in `pgws_live.topics` and so survive restarts and are the same on
//! every gateway. Each creation of a name gets a new `incarnation`; a topic's messages travel
//! on [`crate::Subjects::live`] of that incarnation, so subscribers of a destroyed topic never
//! hear a later topic of the same name.
//!
//! Table topics (`PGWS_TABLE_TOPICS`) are answered by the same service: a `get` with a
//! [`Reader`] names a table topic's permission class ([`LiveClass`]) when the reader may
//! SELECT the table; a gateway then reads the class's subject ([`crate::Subjects::table`]) and
//! reports the class to the leader bridge, whose change capture publishes there the events of
//! the rows that class may see, one visibility check per class, not per socket.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// Most custom topics one owner may have.
pub const MAX_TOPICS_PER_OWNER: i64 = 1000;

/// Most bytes of the claims a table topic's permission class keeps (its `claims` JSON): a
/// class travels in the gateway's presence reports and is a key of the leader's work, so a
/// token whose claims read by the table's policies are larger is refused for table topics.
pub const MAX_CLASS_CLAIMS: usize = 4096;

/// Longest topic name, in bytes (a table topic is named after a PostgreSQL identifier).
pub const MAX_LIVE_TOPIC: usize = 63;

/// Whether `name` can be a topic: 1 to [`MAX_LIVE_TOPIC`] bytes, no control character, no
/// comma (requests list topics separated by commas), no space at either end.
pub fn valid_live_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_LIVE_TOPIC
        && !name.chars().any(|c| c.is_control() || c == ',')
        && name.trim() == name
}

/// What a gateway asks about custom topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum LiveTopicOp {
    /// Creates `name` owned by `owner` (the creator's `sub`).
    Create {
        name: String,
        owner: String,
        public: bool,
    },
    /// Destroys `name` if `caller` owns it or `admin`.
    Destroy {
        name: String,
        caller: Option<String>,
        admin: bool,
    },
    /// The topic `name` as `caller` sees it (its own topic of that name, else the public one,
    /// else another's private one, which the gateway shows only to admins); with a `reader`,
    /// a table topic's class for that reader.
    Get {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reader: Option<Reader>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caller: Option<String>,
    },
    /// The topics `caller` may see: public ones, its own, every one for an admin; and the
    /// table topics whose table `role` may SELECT.
    List {
        caller: Option<String>,
        admin: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        /// The page after this name (the `next` of the page before); table topics come on
        /// the first page only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
}

/// Who wants to read a table topic: what PostgreSQL sees of a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reader {
    /// The token's `role` claim (PostgREST's convention).
    pub role: Option<String>,
    /// The token's whole claims, as `request.jwt.claims`.
    pub claims: Map<String, Value>,
    /// The role is one of `PGWS_ADMIN_ROLES`.
    pub admin: bool,
}

/// A permission class of a table topic: the sockets PostgreSQL treats the same when they read
/// the table, so one visibility check serves them all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LiveClass {
    /// The table topic.
    pub topic: String,
    /// The role the check runs as (`SET LOCAL ROLE`).
    pub role: String,
    /// The claims the table's policies can read, as compact JSON with sorted keys (the value
    /// of `request.jwt.claims` during the check); all of them when that cannot be narrowed.
    pub claims: String,
    /// Sees every row, and the whole old row of a delete (admins).
    pub all: bool,
    /// Set when the table's policies compare a column with a claim (routing by value): the
    /// leader checks this class only against the changed rows whose column equals the
    /// claim's value, all such classes of a role in one statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<LiveRoute>,
}

/// A class's routing key: the rows whose `column` has this `value` (as PostgreSQL prints it)
/// are the only ones its policies can let it see.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LiveRoute {
    /// The table's column the policies compare with a claim.
    pub column: String,
    /// The claim's value, as the column's type prints it; `None` (the claim is missing or
    /// null): no row can match.
    pub value: Option<String>,
}

impl LiveClass {
    /// The class's name in subjects: 32 hex digits of the SHA-256 of its fields (two classes
    /// that differ in any field never share a subject).
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.topic, &self.role, &self.claims] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.update([u8::from(self.all)]);
        if let Some(route) = &self.route {
            for part in [Some(&route.column), route.value.as_ref()] {
                match part {
                    Some(p) => {
                        h.update([1]);
                        h.update((p.len() as u64).to_be_bytes());
                        h.update(p.as_bytes());
                    }
                    None => h.update([0]),
                }
            }
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A custom topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTopic {
    pub name: String,
    pub owner: String,
    pub public: bool,
    /// Unique per creation of the name.
    pub incarnation: i64,
}

impl LiveTopic {
    /// Whether a socket whose token has `sub` (and is an admin or not) may subscribe and
    /// publish.
    pub fn open_to(&self, sub: Option<&str>, admin: bool) -> bool {
        admin || self.public || sub == Some(self.owner.as_str())
    }
}

/// How a topic operation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveOutcome {
    Ok,
    /// `create` of a name that exists.
    Exists,
    /// No such topic.
    Absent,
    /// `destroy` by someone else than its owner or an admin; a table topic the reader may
    /// not SELECT, or one written to or destroyed (see `error`).
    Forbidden,
    /// `create` by an owner who has [`MAX_TOPICS_PER_OWNER`] topics already.
    Limit,
    /// The bridge could not answer (database unavailable, invalid request): see `error`.
    Unavailable,
}

/// A bridge's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTopicReply {
    pub outcome: LiveOutcome,
    /// `create`, `destroy` (the topic destroyed) and `get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<LiveTopic>,
    /// `list`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<LiveTopic>,
    /// `get` of a table topic with a reader: the reader's class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<LiveClass>,
    /// `list`: the table topics the role may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// `list`: more topics follow the last of `topics`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LiveTopicReply {
    /// An outcome without data.
    pub fn outcome(outcome: LiveOutcome) -> Self {
        Self {
            outcome,
            topic: None,
            topics: Vec::new(),
            class: None,
            tables: Vec::new(),
            more: false,
            error: None,
        }
    }

    /// An outcome and why.
    pub fn refused(outcome: LiveOutcome, error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::outcome(outcome)
        }
    }

    /// `ok` with one topic.
    pub fn topic(topic: LiveTopic) -> Self {
        Self {
            topic: Some(topic),
            ..Self::outcome(LiveOutcome::Ok)
        }
    }

    /// `unavailable`, and why.
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::outcome(LiveOutcome::Unavailable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_bounded() {
        assert!(valid_live_topic("chat-room-1"));
        assert!(valid_live_topic(&"é".repeat(31)));
        for bad in ["", " chat", "chat ", "a,b", "a\nb", "a\0b"] {
            assert!(!valid_live_topic(bad), "{bad:?}");
        }
        assert!(!valid_live_topic(&"x".repeat(64)));
    }

    #[test]
    fn ops_are_tagged() {
        let op = LiveTopicOp::Get {
            name: "t".into(),
            reader: None,
            caller: None,
        };
        assert_eq!(
            serde_json::to_string(&op).unwrap(),
            r#"{"op":"get","name":"t"}"#
        );
        let reply = LiveTopicReply::outcome(LiveOutcome::Absent);
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"outcome":"absent"}"#
        );
    }

    #[test]
    fn who_may_use_a_topic() {
        let t = LiveTopic {
            name: "t".into(),
            owner: "ann".into(),
            public: false,
            incarnation: 1,
        };
        assert!(t.open_to(Some("ann"), false));
        assert!(!t.open_to(Some("bob"), false));
        assert!(!t.open_to(None, false));
        assert!(t.open_to(None, true));
        assert!(LiveTopic { public: true, ..t }.open_to(None, false));
    }

    #[test]
    fn classes_differing_anywhere_have_other_keys() {
        let c = LiveClass {
            topic: "orders".into(),
            role: "web".into(),
            claims: r#"{"sub":"ann"}"#.into(),
            all: false,
            route: None,
        };
        let key = c.key();
        assert_eq!(key.len(), 32);
        assert_eq!(key, c.clone().key());
        // The lengths are hashed too: moving a byte from one field to the next is another class.
        let shifted = LiveClass {
            topic: "orders".into(),
            role: "we".into(),
            claims: r#"b{"sub":"ann"}"#.into(),
            all: false,
            route: None,
        };
        for other in [
            LiveClass {
                all: true,
                ..c.clone()
            },
            LiveClass {
                role: "web2".into(),
                ..c.clone()
            },
            LiveClass {
                claims: r#"{"sub":"bob"}"#.into(),
                ..c.clone()
            },
            LiveClass {
                route: Some(LiveRoute {
                    column: "owner".into(),
                    value: Some("ann".into()),
                }),
                ..c.clone()
            },
            LiveClass {
                route: Some(LiveRoute {
                    column: "owner".into(),
                    value: None,
                }),
                ..c.clone()
            },
            shifted,
        ] {
            assert_ne!(other.key(), key, "{other:?}");
        }
    }
}
