//! NATS header names of the contract.

/// The unique id of a client message, assigned by the gateway; JetStream's duplicate window
/// uses it, and the recorder stores it as the audit row's primary key.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// On an audit record holding several envelopes (the messages of one NOTIFY request): their
/// message ids, comma separated, in order; the body is the envelopes separated by `\n`, and
/// `Nats-Msg-Id` is the first id. Absent on a record of one envelope.
pub const MSG_IDS: &str = "Pgws-Msg-Ids";

/// On an audit record: the PostgreSQL channel the message was notified on.
pub const NOTIFY_CHANNEL: &str = "Pgws-Notify-Channel";

/// On a delivery: when the bridge received the notification from PostgreSQL, unix
/// microseconds (decimal text); the gateway's database -> socket latency starts there.
pub const LISTENED_AT: &str = "Pgws-Listened-At";

/// W3C trace context (on NOTIFY requests, deliveries and audit records) when tracing is on.
pub const TRACEPARENT: &str = "traceparent";
