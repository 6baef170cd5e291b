//! The postgres-websockets message envelope.
//!
//! What a socket sends reaches the database as this JSON object, byte-compatible in field
//! names and types with postgres-websockets, so database functions written for it keep working:
//! `{"event":"WebsocketMessage","channel":"chat","payload":"...","claims":{...,"message_delivered_at":1602719440.72}}`.
//! Notifications coming back are routed by their `channel` field.

use serde::{Deserialize, Serialize};
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

/// One envelope, borrowed from its parts.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// `WebsocketMessage`, `ConnectionOpen` or `ConnectionClose`.
    pub event: &'a str,
    /// The websocket channel (not the PostgreSQL channel it is notified on).
    pub channel: &'a str,
    /// The frame's text, or for connection events the socket's channels comma separated.
    pub payload: &'a str,
    /// The token's claims; `message_delivered_at` is added.
    pub claims: &'a EnvelopeClaims,
    /// `message_delivered_at`: unix seconds.
    pub at: f64,
}

/// The claim the gateway sets in every envelope.
const DELIVERED_AT: &str = "message_delivered_at";

/// A token's claims as envelopes carry them, encoded once per socket: the compact JSON object
/// of every claim but `message_delivered_at`, without its closing brace. Each envelope copies
/// it and adds `message_delivered_at`, holding the gateway's time: added, or replacing a claim
/// of that name (as postgres-websockets does), so the member appears once. A socket keeps this
/// rather than the parsed claims: a small fraction of their memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeClaims(Box<str>);

impl EnvelopeClaims {
    /// Encodes `claims`.
    pub fn new(claims: &Map<String, Value>) -> Self {
        let mut open = b"{".to_vec();
        for (name, value) in claims {
            if name == DELIVERED_AT {
                continue;
            }
            if open.len() > 1 {
                open.push(b',');
            }
            write_json(&mut open, name);
            open.push(b':');
            write_json(&mut open, value);
        }
        Self(String::from_utf8(open).unwrap_or_default().into_boxed_str())
    }

    /// The claims again, without `message_delivered_at`.
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(&format!("{}}}", self.0)).unwrap_or_default()
    }
}

/// Appends `value`'s JSON (strings, numbers and JSON values always encode).
fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
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
        claims: &'a EnvelopeClaims,
        at: f64,
    ) -> Self {
        Self {
            event,
            channel,
            payload,
            claims,
            at,
        }
    }

    /// The JSON text: `{"event":...,"channel":...,"payload":...,"claims":{...}}`.
    pub fn to_json(&self) -> String {
        let claims = &self.claims.0;
        let mut out = Vec::with_capacity(96 + self.payload.len() + claims.len());
        out.extend_from_slice(br#"{"event":"#);
        write_json(&mut out, self.event);
        out.extend_from_slice(br#","channel":"#);
        write_json(&mut out, self.channel);
        out.extend_from_slice(br#","payload":"#);
        write_json(&mut out, self.payload);
        out.extend_from_slice(br#","claims":"#);
        out.extend_from_slice(claims.as_bytes());
        if claims.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(br#""message_delivered_at":"#);
        write_json(&mut out, &self.at);
        out.extend_from_slice(b"}}");
        // Only JSON text was written.
        String::from_utf8(out).unwrap_or_default()
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
        let json = Envelope::new(
            WEBSOCKET_MESSAGE,
            "chat",
            "hi \"there\"",
            &EnvelopeClaims::new(&claims),
            1.5,
        )
        .to_json();
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
        let json = Envelope::new(
            WEBSOCKET_MESSAGE,
            "c",
            "p",
            &EnvelopeClaims::new(&claims),
            2.5,
        )
        .to_json();
        assert_eq!(
            json,
            r#"{"event":"WebsocketMessage","channel":"c","payload":"p","claims":{"mode":"r","message_delivered_at":2.5}}"#
        );
    }

    #[test]
    fn claims_are_encoded_once_and_read_back() {
        let json = Envelope::new("E", "c", "", &EnvelopeClaims::new(&Map::new()), 3.0).to_json();
        assert_eq!(
            json,
            r#"{"event":"E","channel":"c","payload":"","claims":{"message_delivered_at":3.0}}"#
        );
        let mut claims = Map::new();
        claims.insert("role".into(), Value::from("a\"b"));
        claims.insert("n".into(), serde_json::json!({"x": [1, 2.5, null]}));
        claims.insert(DELIVERED_AT.into(), Value::from(1));
        let encoded = EnvelopeClaims::new(&claims);
        claims.remove(DELIVERED_AT);
        assert_eq!(encoded.to_map(), claims);
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
