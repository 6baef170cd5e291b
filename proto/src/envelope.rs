//! The postgres-websockets message envelope.
//!
//! What a socket sends reaches the database as this JSON object, byte-compatible in field
//! names and types with postgres-websockets, so database functions written for it keep working:
//! `{"event":"WebsocketMessage","channel":"chat","payload":"...","claims":{...,"message_delivered_at":1602719440.72}}`.
//! Notifications coming back are routed by their `channel` field.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// The event name of a message sent by a socket.
pub const WEBSOCKET_MESSAGE: &str = "WebsocketMessage";

/// Connection events sent on `PGWS_META_CHANNEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// A socket was accepted (as postgres-websockets does).
    Open,
    /// A socket went away (postgres-websockets has no such event).
    Close,
}

impl ConnectionEvent {
    /// The `event` field's value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Open => "ConnectionOpen",
            Self::Close => "ConnectionClose",
        }
    }
}

/// One envelope, borrowed from its parts so it is encoded without copies.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// `WebsocketMessage`, `ConnectionOpen` or `ConnectionClose`.
    pub event: &'a str,
    /// The websocket channel (not the PostgreSQL channel it is notified on).
    pub channel: &'a str,
    /// The frame's text, or for connection events the socket's channels comma separated.
    pub payload: &'a str,
    /// The token's claims plus `message_delivered_at`.
    pub claims: ClaimsWithTime<'a>,
}

/// The claims of the socket's token with `message_delivered_at` (unix seconds) set: added,
/// or replacing a claim of that name (as postgres-websockets does), so the member appears
/// once and always holds the gateway's time.
#[derive(Debug)]
pub struct ClaimsWithTime<'a> {
    claims: &'a Map<String, Value>,
    message_delivered_at: f64,
}

/// The claim the gateway sets in every envelope.
const DELIVERED_AT: &str = "message_delivered_at";

impl Serialize for ClaimsWithTime<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in self.claims {
            if name != DELIVERED_AT {
                map.serialize_entry(name, value)?;
            }
        }
        map.serialize_entry(DELIVERED_AT, &self.message_delivered_at)?;
        map.end()
    }
}

/// Why a notification payload could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a JSON object.
    #[error("notification payload is not a JSON object")]
    NotJson,
    /// No string `channel` field.
    #[error("notification payload has no string \"channel\" field")]
    NoChannel,
}

impl<'a> Envelope<'a> {
    /// Builds an envelope; `at` is unix time in seconds.
    pub fn new(
        event: &'a str,
        channel: &'a str,
        payload: &'a str,
        claims: &'a Map<String, Value>,
        at: f64,
    ) -> Self {
        Self {
            event,
            channel,
            payload,
            claims: ClaimsWithTime {
                claims,
                message_delivered_at: at,
            },
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> String {
        // Serialising borrowed strings and a JSON map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The channel a notification payload is addressed to, as postgres-websockets routes it:
    /// a JSON object with a string `channel` field.
    pub fn route(payload: &str) -> Result<String, EnvelopeError> {
        #[derive(Deserialize)]
        struct Routing {
            channel: Option<Value>,
        }
        if !payload.trim_start().starts_with('{') {
            return Err(EnvelopeError::NotJson);
        }
        let r: Routing = serde_json::from_str(payload).map_err(|_| EnvelopeError::NotJson)?;
        match r.channel {
            Some(Value::String(c)) => Ok(c),
            _ => Err(EnvelopeError::NoChannel),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_matches_postgres_websockets() {
        let mut claims = Map::new();
        claims.insert("mode".into(), Value::from("rw"));
        claims.insert("user".into(), Value::from(7));
        let json = Envelope::new(WEBSOCKET_MESSAGE, "chat", "hi \"there\"", &claims, 1.5).to_json();
        assert_eq!(
            json,
            r#"{"event":"WebsocketMessage","channel":"chat","payload":"hi \"there\"","claims":{"mode":"rw","user":7,"message_delivered_at":1.5}}"#
        );
        assert_eq!(Envelope::route(&json), Ok("chat".to_owned()));
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/envelope.rs`): a token with its own
    /// `message_delivered_at` claim made an envelope that named the member twice.
    #[test]
    fn the_gateway_time_replaces_a_claim_of_that_name() {
        let mut claims = Map::new();
        claims.insert("message_delivered_at".into(), Value::from("forged"));
        claims.insert("mode".into(), Value::from("r"));
        let json = Envelope::new(WEBSOCKET_MESSAGE, "c", "p", &claims, 2.5).to_json();
        assert_eq!(
            json,
            r#"{"event":"WebsocketMessage","channel":"c","payload":"p","claims":{"mode":"r","message_delivered_at":2.5}}"#
        );
    }

    #[test]
    fn routing_needs_a_string_channel() {
        assert_eq!(Envelope::route("nope"), Err(EnvelopeError::NotJson));
        assert_eq!(Envelope::route("[1]"), Err(EnvelopeError::NotJson));
        assert_eq!(
            Envelope::route(r#"{"channel":1}"#),
            Err(EnvelopeError::NoChannel)
        );
        assert_eq!(
            Envelope::route(r#"{"payload":"x"}"#),
            Err(EnvelopeError::NoChannel)
        );
        assert_eq!(
            Envelope::route(r#"{"channel":"a.b","x":[1]}"#),
            Ok("a.b".to_owned())
        );
    }
}
