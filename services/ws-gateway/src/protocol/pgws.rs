//! postgres-websockets, the default protocol: a socket reads the delivery subjects of its
//! channels (notifications on `PGWS_LISTEN_CHANNEL` routed by their envelope's `channel`), and
//! each frame it sends becomes one envelope per channel, NOTIFYed on the listen channel.
//! Refused frames get an error frame `{"event":"Error","error":...}` and the socket stays.
//!
//! In-band token refresh, for sockets whose token has `"refresh": true` (others see no
//! change): a text frame of NUL, `refresh `, then the new token (no client message can start
//! so: NUL is refused in messages). The new token must verify, and may narrow but never widen
//! the socket: its mode within the socket's, the socket's channels it still allows (the others
//! are left), every other claim but `exp`, `iat`, `nbf` and `jti` unchanged. Answered
//! `{"event":"TokenRefreshed","expires_at":...,"channels":[...],"mode":"r"|"w"|"rw"}`, or an
//! error frame marked `"request":"refresh"`; the socket's expiry moves to the new token's.

use super::{receive_span, same_claims_apart_from, Action, Admission, Frame, Protocol};
use crate::uplink::Pending;
use crate::Gateway;
use axum::extract::ws::{Message, Utf8Bytes};
use pgws_auth::{Grant, Mode};
use pgws_proto::{
    ConnectionEvent, Envelope, EnvelopeClaims, Notification, MAX_NOTIFY_PAYLOAD, WEBSOCKET_MESSAGE,
};
use serde_json::Value;

/// The token claim that asks for gap signals (`"gaps": true`).
const GAPS_CLAIM: &str = "gaps";
/// The token claim that allows in-band refresh (`"refresh": true`).
const REFRESH_CLAIM: &str = "refresh";
/// A refresh frame starts so; the token follows.
pub(crate) const REFRESH_PREFIX: &str = "\0refresh ";
/// Claims a refresh may narrow (checked by [`Pgws::refresh`]).
const NARROWABLE: [&str; 3] = ["mode", "channel", "channels"];

/// A postgres-websockets socket: what its token granted.
pub(crate) struct Pgws {
    mode: Mode,
    channels: Vec<String>,
    /// The token's claims, encoded once for the envelopes (every socket holds them).
    claims: EnvelopeClaims,
    /// Whether the token allows in-band refresh.
    refreshable: bool,
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
    let gaps = reads && grant.claims.get(GAPS_CLAIM) == Some(&Value::Bool(true));
    let protocol = Pgws {
        mode: grant.mode,
        refreshable: grant.claims.get(REFRESH_CLAIM) == Some(&Value::Bool(true)),
        claims: EnvelopeClaims::new(&grant.claims),
        channels: grant.channels,
    };
    let opening = protocol
        .meta_notification(gw, ConnectionEvent::Open)
        .map(Pending::untraced);
    Admission {
        label: "postgres-websockets",
        subjects,
        registrations: Vec::new(),
        gaps,
        dynamic: false,
        send_queue: None,
        expires_at: grant.expires_at,
        opening,
        protocol: Box::new(protocol),
        resume: None,
        after_join: None,
    }
}

impl Protocol for Pgws {
    fn frame(&mut self, gw: &Gateway, frame: Frame) -> Action {
        if let Some(token) = frame
            .as_text()
            .and_then(|t| t.strip_prefix(REFRESH_PREFIX))
            .filter(|_| self.refreshable)
        {
            return self.refresh(gw, token);
        }
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
        self.meta_notification(gw, ConnectionEvent::Close)
            .map(Pending::untraced)
    }
}

impl Pgws {
    /// A refresh frame's token: the socket narrows to what it allows, and its expiry moves.
    fn refresh(&mut self, gw: &Gateway, token: &str) -> Action {
        let refused = |why: String| {
            gw.metrics.refused("refresh_refused");
            let json = serde_json::json!({"event": "Error", "error": why, "request": "refresh"});
            Action::Reply(Message::Text(Utf8Bytes::from(json.to_string())))
        };
        let verified = match gw.config.authorizer.verify(token.trim(), unix_now() as u64) {
            Ok(v) => v,
            Err(e) => return refused(format!("token refused: {e}")),
        };
        // Compared as envelopes carry them: `message_delivered_at` is the gateway's anyway.
        let claims = EnvelopeClaims::new(&verified.claims);
        if !same_claims_apart_from(&claims.to_map(), &self.claims.to_map(), &NARROWABLE) {
            return refused(
                "a refreshed token carries the socket's claims: only exp, iat, nbf, jti, and a \
                 narrower mode or channels may differ"
                    .to_owned(),
            );
        }
        let mode = verified.mode;
        let old = &self.mode;
        if (mode.can_read() && !old.can_read()) || (mode.can_write() && !old.can_write()) {
            return refused("a refreshed token may not widen the socket's mode".to_owned());
        }
        let kept: Vec<String> = self
            .channels
            .iter()
            .filter(|c| verified.clone().grant(Some(c)).is_ok())
            .cloned()
            .collect();
        if kept.is_empty() {
            return refused("the refreshed token allows none of the socket's channels".to_owned());
        }
        let subjects = &gw.config.nats.subjects;
        let mut actions: Vec<Action> = self
            .channels
            .iter()
            .filter(|c| old.can_read() && (!mode.can_read() || !kept.contains(c)))
            .map(|c| Action::Leave(subjects.deliver(c), None))
            .collect();
        let expires_at = verified.expires_at;
        let reply = serde_json::json!({
            "event": "TokenRefreshed",
            "expires_at": expires_at,
            "channels": kept,
            "mode": match mode { Mode::Read => "r", Mode::Write => "w", Mode::ReadWrite => "rw" },
        });
        self.mode = mode;
        self.channels = kept;
        self.claims = claims;
        gw.metrics.refreshed.inc();
        actions.push(Action::Expire(expires_at));
        actions.push(Action::Reply(Message::Text(Utf8Bytes::from(
            reply.to_string(),
        ))));
        Action::Many(actions)
    }

    /// The notification of a connection event, on `PGWS_META_CHANNEL` when one is set.
    fn meta_notification(&self, gw: &Gateway, event: ConnectionEvent) -> Option<Notification> {
        let meta = gw.config.meta_channel.as_deref()?;
        let channels = self.channels.join(",");
        let payload =
            Envelope::new(event.name(), meta, &channels, &self.claims, unix_now()).to_json();
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

    /// Turns a client frame into notifications (one per channel of the socket), or an error
    /// frame for the client.
    fn accept(&self, gw: &Gateway, text: &str) -> Result<Action, Message> {
        if !self.mode.can_write() {
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
        let span = receive_span(&self.channels.join(","), text.len());
        let mut notes = Vec::with_capacity(self.channels.len());
        for channel in &self.channels {
            let payload =
                Envelope::new(WEBSOCKET_MESSAGE, channel, text, &self.claims, at).to_json();
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
