//! The NOTIFY request: gateway -> bridge, over NATS request/reply.
//!
//! A request carries the NOTIFYs of one socket, in the order the socket sent them. A gateway
//! keeps at most one request in flight per socket, so a socket's messages reach PostgreSQL in
//! order whichever bridge serves each request. The bridge replies only after the transaction
//! holding them committed: a reply with `ok: true` means "in the database".
//!
//! A gateway retries a request that got no answer in time, and the first copy may still be
//! waiting in a stalled bridge. So a request carries an `id` (the same on every retry) and a
//! `deadline`: bridges execute each id at most once (see pg-bridge's dedup table) and never
//! start a request whose deadline has passed, when the gateway has given up on it.

use serde::{Deserialize, Serialize};

/// One `pg_notify(channel, payload)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The message's unique id, assigned by the gateway (the audit record's `Nats-Msg-Id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The PostgreSQL channel (for postgres-websockets, `PGWS_LISTEN_CHANNEL`).
    pub channel: String,
    /// The payload (the envelope's JSON).
    pub payload: String,
}

/// Body of a request on [`crate::Subjects::notify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyRequest {
    /// Unique per request, the same on each retry; executed at most once when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When the sender gives up on the request: unix time in milliseconds. A bridge does not
    /// start a request past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Executed in this order, all in the same transaction or a few consecutive ones.
    pub notifications: Vec<Notification>,
    /// The audit records of the request's client messages when the bridge writes the audit
    /// itself (one process, no audit stream): each is the message's id, the channel it is
    /// NOTIFYed on and the envelope recorded, and is written in the transaction that NOTIFYs
    /// the notification with the same id. Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Notification>,
    /// Every notification with an id is also the audit record of its message, as if it were
    /// repeated in `records` (the common case: the envelope NOTIFYed is the one recorded, sent
    /// once instead of twice).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_notifications: bool,
}

impl NotifyRequest {
    /// A request without id or deadline (executed each time it is received).
    pub fn new(notifications: Vec<Notification>) -> Self {
        Self {
            id: None,
            deadline_ms: None,
            notifications,
            records: Vec::new(),
            record_notifications: false,
        }
    }
}

/// Body of the bridge's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyReply {
    /// `true` once every notification of the request is committed.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NotifyReply {
    /// A success.
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
        }
    }

    /// A failure with its reason.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
        }
    }
}
