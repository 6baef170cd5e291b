//! The wire contract between the pgws services, defined once.
//!
//! Everything that crosses NATS is described here and nowhere else: the subject names (all
//! derived from one prefix, so several stacks can share a NATS server), the reversible mapping
//! from PostgreSQL channel names to subject tokens, the postgres-websockets message envelope
//! the NOTIFY request the gateways send to the bridges, and the stack-wide state kept by the
//! leader bridge (direct channels to LISTEN, wspubsub topics) and the API-key checks. `CONTRACT.md` next to this crate
//! documents the same thing for people.

mod envelope;
pub mod headers;
mod live;
mod notify;
mod stack;
mod subject;

pub use envelope::{ConnectionEvent, Envelope, EnvelopeClaims, EnvelopeError, WEBSOCKET_MESSAGE};
pub use live::{
    valid_live_topic, LiveClass, LiveOutcome, LiveRoute, LiveTopic, LiveTopicOp, LiveTopicReply,
    Reader, MAX_CLASS_CLAIMS, MAX_LIVE_TOPIC, MAX_TOPICS_PER_OWNER,
};
pub use notify::{Notification, NotifyReply, NotifyRequest};
pub use stack::{
    Ack, KeyCheck, Presence, RegistryOp, RegistryReply, RegistryRequest, ReportPart, Topic,
    MAX_REPORT_PARTS, PRESENCE_EXPIRY_SECS, PRESENCE_INTERVAL_SECS,
};
pub use subject::{decode_channel, encode_channel, Prefix, PrefixError, Subjects, TokenError};

/// PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (default build).
pub const MAX_NOTIFY_PAYLOAD: usize = 7999;

/// PostgreSQL truncates identifiers at 63 bytes; `pg_notify` refuses longer channel names.
pub const MAX_PG_CHANNEL: usize = 63;

/// Whether PostgreSQL accepts `channel` as a channel name: 1 to [`MAX_PG_CHANNEL`] bytes, no
/// NUL. Bounding a channel also bounds every subject built from it.
pub fn valid_channel(channel: &str) -> bool {
    !channel.is_empty() && channel.len() <= MAX_PG_CHANNEL && !channel.contains('\0')
}

/// The default `PGWS_LISTEN_CHANNEL`, as in postgres-websockets.
pub const DEFAULT_LISTEN_CHANNEL: &str = "postgres-websockets-listener";

/// The default `PGWS_NATS_PREFIX`.
pub const DEFAULT_PREFIX: &str = "pgws";

/// Longest wspubsub domain (the seed's `apikeys.domain` is `varchar(64)`), in bytes.
pub const MAX_DOMAIN: usize = 64;

/// Longest wspubsub topic name, in bytes.
pub const MAX_TOPIC: usize = 128;

/// Longest API key accepted (the seed's `apikeys.apikey` is `varchar(36)`), in bytes.
pub const MAX_APIKEY: usize = 64;
