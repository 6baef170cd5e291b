//! The wire contract between the pgws services, defined once.
//!
//! Everything that crosses NATS is described here and nowhere else: the subject names (all
//! derived from one prefix, so several stacks can share a NATS server), the reversible mapping
//! from PostgreSQL channel names to subject tokens, the postgres-websockets message envelope
//! and the NOTIFY request the gateways send to the bridges. `CONTRACT.md` next to this crate
//! documents the same thing for people.

mod envelope;
pub mod headers;
mod notify;
mod subject;

pub use envelope::{ConnectionEvent, Envelope, EnvelopeError, WEBSOCKET_MESSAGE};
pub use notify::{Notification, NotifyReply, NotifyRequest};
pub use subject::{decode_channel, encode_channel, Prefix, PrefixError, Subjects, TokenError};

/// PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (default build).
pub const MAX_NOTIFY_PAYLOAD: usize = 7999;

/// PostgreSQL truncates identifiers at 63 bytes; `pg_notify` refuses longer channel names.
pub const MAX_PG_CHANNEL: usize = 63;

/// The default `PGWS_LISTEN_CHANNEL`, as in postgres-websockets.
pub const DEFAULT_LISTEN_CHANNEL: &str = "postgres-websockets-listener";

/// The default `PGWS_NATS_PREFIX`.
pub const DEFAULT_PREFIX: &str = "pgws";
