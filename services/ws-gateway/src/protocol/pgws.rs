//! postgres-websockets, the default protocol: a socket reads the delivery subjects of its
//! channels (notifications on `PGWS_LISTEN_CHANNEL` routed by their envelope's `channel`), and
//! each frame it sends becomes one envelope per channel, NOTIFYed on the listen channel.
//! Refused frames get an error frame `{"event":"Error","error":...}` and the socket stays.

use super::{receive_span, Action, Admission, Frame, Protocol};
use crate::uplink::Pending;
use crate::Gateway;
use axum::extract::ws::{Message, Utf8Bytes};
use pgws_auth::Grant;
use pgws_proto::{ConnectionEvent, Envelope, Notification, MAX_NOTIFY_PAYLOAD, WEBSOCKET_MESSAGE};

/// The token claim that asks for gap signals (`"gaps": true`).
const GAPS_CLAIM: &str = "gaps";

/// A postgres-websockets socket.
pub(crate) struct Pgws {
    grant: Grant,
}

/// What the core needs for a socket with `grant`.
pub(crate) fn admission(gw: &Gateway, grant: Grant) -> Admission {
    let reads = grant.mode.can_read();
    let subjects = if reads {
        let subjects = &gw.config.nats.subjects;
        grant.channels.iter().map(|c| subjects.deliver(c)).collect()
    } else {
        Vec::new()
    };
    // Opt-in: only sockets whose token asks for gap signals get them.
    let gaps = reads && grant.claims.get(GAPS_CLAIM) == Some(&serde_json::Value::Bool(true));
    let opening = meta_notification(gw, &grant, ConnectionEvent::Open).map(Pending::untraced);
    Admission {
        label: "postgres-websockets",
        subjects,
        registrations: Vec::new(),
        gaps,
        dynamic: false,
        send_queue: None,
        expires_at: grant.expires_at,
        opening,
        protocol: Box::new(Pgws { grant }),
    }
}

impl Protocol for Pgws {
    fn frame(&mut self, gw: &Gateway, frame: Frame) -> Action {
        let refused = match frame.as_text() {
            Some(text) => self.accept(gw, text),
            None => Err(refuse(
                gw,
                "binary_not_utf8",
                "binary frames must hold UTF-8 text (NOTIFY payloads are text)",
            )),
        };
        refused.unwrap_or_else(Action::Reply)
    }

    fn undelivered(&self, n: usize, reason: &str) -> Action {
        let text = format!("{n} message(s) could not be delivered to the database: {reason}");
        Action::Reply(error_frame(&text))
    }

    fn closing(&mut self, gw: &Gateway) -> Option<Pending> {
        meta_notification(gw, &self.grant, ConnectionEvent::Close).map(Pending::untraced)
    }
}

impl Pgws {
    /// Turns a client frame into notifications (one per channel of the socket), or an error
    /// frame for the client.
    fn accept(&self, gw: &Gateway, text: &str) -> Result<Action, Message> {
        let grant = &self.grant;
        if !grant.mode.can_write() {
            return Err(refuse(
                gw,
                "read_only",
                "this socket is read-only (token mode \"r\")",
            ));
        }
        if text.contains('\0') {
            return Err(refuse(
                gw,
                "nul_character",
                "message refused: PostgreSQL text cannot hold NUL characters",
            ));
        }
        let at = unix_now();
        // One trace per client message: this span, the gateway's publish, the bridge's batch
        // and NOTIFY.
        let span = receive_span(&grant.channels.join(","), text.len());
        let mut notes = Vec::with_capacity(grant.channels.len());
        for channel in &grant.channels {
            let payload =
                Envelope::new(WEBSOCKET_MESSAGE, channel, text, &grant.claims, at).to_json();
            if payload.len() > MAX_NOTIFY_PAYLOAD {
                let why = format!(
                    "message too large: its envelope is {} bytes and PostgreSQL NOTIFY allows at most {MAX_NOTIFY_PAYLOAD}",
                    payload.len()
                );
                return Err(refuse(gw, "too_large", &why));
            }
            let note = Notification {
                id: Some(gw.message_id()),
                channel: gw.config.listen_channel.clone(),
                payload,
            };
            notes.push(Pending::message(note, span.clone()));
        }
        gw.metrics.accepted(text.len());
        Ok(Action::Notify(notes))
    }
}

/// Unix time in seconds, as `message_delivered_at`.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn refuse(gw: &Gateway, reason: &'static str, text: &str) -> Message {
    gw.metrics.refused(reason);
    error_frame(text)
}

/// The frame a client gets when its message is refused or lost:
/// `{"event":"Error","error":"<reason>"}`.
pub(crate) fn error_frame(text: &str) -> Message {
    let json = serde_json::json!({"event": "Error", "error": text}).to_string();
    Message::Text(Utf8Bytes::from(json))
}

fn meta_notification(gw: &Gateway, grant: &Grant, event: ConnectionEvent) -> Option<Notification> {
    let meta = gw.config.meta_channel.as_deref()?;
    let channels = grant.channels.join(",");
    let payload = Envelope::new(event.name(), meta, &channels, &grant.claims, unix_now()).to_json();
    if payload.len() > MAX_NOTIFY_PAYLOAD {
        tracing::warn!(
            event = event.name(),
            "connection event too large for NOTIFY; skipped"
        );
        return None;
    }
    Some(Notification {
        id: Some(gw.message_id()),
        channel: gw.config.listen_channel.clone(),
        payload,
    })
}
