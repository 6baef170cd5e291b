//! `/live` (Daptin's websocket API): custom topics, kept by the bridges.
//!
//! A gateway holds no database credentials, so it asks the bridges (queue group
//! `<prefix>.bridge` on [`crate::Subjects::live_topics`]) to create, destroy, find and list
//! custom topics, which live in `pgws_live.topics` and so survive restarts and are the same on
//! every gateway. Each creation of a name gets a new `incarnation`; a topic's messages travel
//! on [`crate::Subjects::live`] of that incarnation, so subscribers of a destroyed topic never
//! hear a later topic of the same name.

use serde::{Deserialize, Serialize};

/// Most custom topics one owner may have.
pub const MAX_TOPICS_PER_OWNER: i64 = 1000;

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
    /// The topic `name`.
    Get { name: String },
    /// The topics `caller` may see: public ones, its own, every one for an admin.
    List { caller: Option<String>, admin: bool },
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
    /// `destroy` by someone else than its owner or an admin.
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
            error: None,
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
        let op = LiveTopicOp::Get { name: "t".into() };
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
}
