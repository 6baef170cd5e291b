//! postgrest-ws direct channels (`PGWS_DIRECT_CHANNELS`): a socket on a direct channel
//! receives the raw payload of every `NOTIFY <channel>` (any sender, byte for byte, as a text
//! frame), and each text it sends (mode `w` or `rw`) becomes exactly one
//! `pg_notify('<channel>', '{"userClaims":{<claims>},"payload":"<text>"}')` on the channel
//! itself. The leader bridge LISTENs on the channel while some socket of the stack reads it;
//! the handshake completes once it does.
//!
//! Nothing but payloads ever reaches such a socket, so there are no error frames: a read-only
//! socket's text is ignored (postgrest-ws did the same), and a message that cannot be NOTIFYed
//! (too large, NUL, not UTF-8, or no bridge in time) closes the socket with a close frame that
//! says why. The audit stream records each message as a postgres-websockets envelope of the
//! channel, so audit rows look the same for every protocol.

use axum::http::StatusCode;
use pgws_auth::Verified;
use pgws_proto::{Envelope, EnvelopeClaims, Notification, MAX_NOTIFY_PAYLOAD, WEBSOCKET_MESSAGE};

use super::pgws::unix_now;
use super::{receive_span, Action, Admission, Frame, Protocol, Refusal};
use crate::presence::Registration;
use crate::uplink::Pending;
use crate::Gateway;

const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_INVALID: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_SERVER_ERROR: u16 = 1011;

/// A socket on a direct channel.
pub(crate) struct Direct {
    channel: String,
    /// The token's claims as compact JSON: the body's `userClaims`.
    user_claims: Box<str>,
    /// The same for the audit record's envelope.
    claims: EnvelopeClaims,
    writes: bool,
}

/// What the core needs for a socket on the direct channel `channel` (a valid channel name:
/// [`super::channel_grant`] checked it).
pub(crate) fn admission(
    gw: &Gateway,
    verified: Verified,
    channel: String,
) -> Result<Admission, Refusal> {
    let config = &gw.config;
    let reserved = [
        Some(config.listen_channel.as_str()),
        config.meta_channel.as_deref(),
        config.audit_channel.as_deref(),
    ];
    if reserved.contains(&Some(channel.as_str())) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "reserved_channel",
            "Error: this channel is reserved by the server",
        ));
    }
    let reads = verified.mode.can_read();
    let (subjects, registrations) = if reads {
        (
            vec![config.nats.subjects.direct(&channel)],
            vec![Registration::Direct(channel.clone())],
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(Admission {
        label: "direct",
        subjects,
        registrations,
        gaps: false,
        dynamic: false,
        send_queue: None,
        expires_at: verified.expires_at,
        opening: None,
        protocol: Box::new(Direct {
            channel,
            writes: verified.mode.can_write(),
            user_claims: serde_json::to_string(&verified.claims)
                .unwrap_or_default()
                .into_boxed_str(),
            claims: EnvelopeClaims::new(&verified.claims),
        }),
        resume: None,
        after_join: None,
    })
}

impl Protocol for Direct {
    fn frame(&mut self, gw: &Gateway, frame: Frame) -> Action {
        let Some(text) = frame.as_text() else {
            gw.metrics.refused("binary_not_utf8");
            return Action::Close(
                CLOSE_UNSUPPORTED,
                "binary frames must hold UTF-8 text".to_owned(),
            );
        };
        if !self.writes {
            gw.metrics.refused("read_only");
            return Action::None;
        }
        if text.contains('\0') {
            gw.metrics.refused("nul_character");
            return Action::Close(
                CLOSE_INVALID,
                "PostgreSQL text cannot hold NUL characters".to_owned(),
            );
        }
        // seed 000's body: every claim of the token, and the text.
        let text_json = serde_json::to_string(text).unwrap_or_default();
        let body = format!(
            r#"{{"payload":{text_json},"userClaims":{}}}"#,
            self.user_claims
        );
        if body.len() > MAX_NOTIFY_PAYLOAD {
            gw.metrics.refused("too_large");
            return Action::Close(
                CLOSE_TOO_BIG,
                format!("message too large for NOTIFY (at most {MAX_NOTIFY_PAYLOAD} bytes)"),
            );
        }
        let span = receive_span(&self.channel, text.len());
        let record = Envelope::new(
            WEBSOCKET_MESSAGE,
            &self.channel,
            text,
            &self.claims,
            unix_now(),
        )
        .to_json();
        let note = Notification {
            id: Some(gw.message_id()),
            channel: self.channel.clone(),
            payload: body,
        };
        gw.metrics.accepted(text.len());
        let mut pending = Pending::message(note, span);
        pending.record = Some(record);
        Action::Notify(vec![pending])
    }

    fn undelivered(&self, _n: usize, _reason: &str) -> Action {
        Action::Close(
            CLOSE_SERVER_ERROR,
            "a message could not be delivered to the database".to_owned(),
        )
    }
}
