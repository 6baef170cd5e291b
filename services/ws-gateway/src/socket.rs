//! One websocket, from its accepted handshake to its close.
//!
//! A single task per socket multiplexes: messages queued by the hub (written in batches, one
//! flush per burst), frames from the client (read only while the pending queue has room:
//! back-pressure), the one NOTIFY request in flight, pings, the token's expiry and the kick
//! (slow consumer or shutdown). On the way out every accepted frame is still handed to a
//! bridge, and `ConnectionClose` is sent when a meta channel is configured.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::future::BoxFuture;
use futures::SinkExt;
use pgws_auth::Grant;
use pgws_proto::{ConnectionEvent, Envelope, Notification, MAX_NOTIFY_PAYLOAD, WEBSOCKET_MESSAGE};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use pgws_service::telemetry::{self, TARGET as TRACE};

use crate::uplink::{Pending, MAX_PER_REQUEST};
use crate::Gateway;

/// Close code postgres-websockets uses when the token expires.
const CLOSE_JWT_EXPIRED: u16 = 3001;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
/// How long a close frame may take to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a socket closed by shutdown is still read for what its client sent before it saw
/// the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// The accepted socket's identity and authorisation.
pub(crate) struct Session {
    pub(crate) grant: Grant,
    pub(crate) rx: mpsc::Receiver<Message>,
    pub(crate) kick: CancellationToken,
}

/// Runs the socket to its end.
pub(crate) async fn run(gw: Arc<Gateway>, mut ws: WebSocket, session: Session) {
    let Session {
        grant,
        mut rx,
        kick,
    } = session;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut inflight: Option<(BoxFuture<'static, Result<(), String>>, usize)> = None;
    if let Some(n) = meta_notification(&gw, &grant, ConnectionEvent::Open) {
        pending.push_back(Pending::untraced(n));
    }
    let expiry = expiry_sleep(grant.expires_at);
    tokio::pin!(expiry);
    let mut ping = tokio::time::interval(gw.config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut unanswered = 0u32;
    let mut receiving = true;
    // Set once the server sent its close frame on shutdown: frames the client sent before it
    // saw that close are still read and accepted, until its own close or this deadline.
    let mut closing: Option<Instant> = None;

    loop {
        if inflight.is_none() && !pending.is_empty() {
            let batch = take_batch(&mut pending);
            let n = batch.len();
            inflight = Some((gw.uplink.send(batch), n));
        }
        let open = closing.is_none();
        tokio::select! {
            biased;
            _ = kick.cancelled(), if open => {
                if !gw.shutdown.token.is_cancelled() {
                    send_close(&mut ws, CLOSE_POLICY, "slow consumer: send queue full").await;
                    break;
                }
                if !send_close(&mut ws, CLOSE_GOING_AWAY, "server shutting down").await {
                    break;
                }
                closing = Some(Instant::now() + CLOSE_LINGER);
            }
            _ = &mut expiry, if open => {
                send_close(&mut ws, CLOSE_JWT_EXPIRED, "JWT expired").await;
                break;
            }
            _ = linger(closing) => break,
            out = rx.recv(), if open && receiving => {
                // No sender left: the socket reads no channel (write-only).
                let Some(first) = out else {
                    receiving = false;
                    continue;
                };
                if write_burst(&mut ws, &mut rx, first).await.is_err() {
                    break;
                }
            }
            result = in_flight(&mut inflight) => {
                let n = inflight.take().map_or(0, |(_, n)| n);
                if let Err(reason) = result {
                    gw.metrics.notify_failed.inc_by(n as u64);
                    tracing::warn!(reason, messages = n, "client messages not delivered to the database");
                    let text = format!("{n} message(s) could not be delivered to the database: {reason}");
                    if open && ws.send(error_frame(&text)).await.is_err() {
                        break;
                    }
                }
            }
            frame = ws.recv(), if pending.len() < gw.config.max_pending => {
                let reply = match frame {
                    Some(Ok(Message::Text(text))) => accept(&gw, &grant, text.as_str(), &mut pending),
                    Some(Ok(Message::Binary(data))) => match std::str::from_utf8(&data) {
                        Ok(text) => accept(&gw, &grant, text, &mut pending),
                        Err(_) => Some(refuse(&gw, "binary_not_utf8", "binary frames must hold UTF-8 text (NOTIFY payloads are text)")),
                    },
                    Some(Ok(Message::Pong(_))) => {
                        unanswered = 0;
                        None
                    }
                    Some(Ok(Message::Ping(_))) => None,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "socket read failed");
                        break;
                    }
                };
                // After our close frame no data frame may be sent: refusals are only counted.
                if let Some(reply) = reply.filter(|_| open) {
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            }
            _ = ping.tick(), if open => {
                if unanswered >= 2 {
                    break;
                }
                unanswered += 1;
                if ws.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(ws);
    // Everything accepted still goes to the database, the close event last.
    if let Some(n) = meta_notification(&gw, &grant, ConnectionEvent::Close) {
        pending.push_back(Pending::untraced(n));
    }
    if let Some((fut, n)) = inflight.take() {
        if let Err(reason) = fut.await {
            gw.metrics.notify_failed.inc_by(n as u64);
            tracing::warn!(reason, messages = n, "client messages lost after close");
        }
    }
    while !pending.is_empty() {
        let batch = take_batch(&mut pending);
        let n = batch.len();
        if let Err(reason) = gw.uplink.send(batch).await {
            gw.metrics.notify_failed.inc_by(n as u64);
            tracing::warn!(reason, messages = n, "client messages lost after close");
        }
    }
}

/// The next request's notifications: the oldest pending, at most [`MAX_PER_REQUEST`].
fn take_batch(pending: &mut VecDeque<Pending>) -> Vec<Pending> {
    let n = pending.len().min(MAX_PER_REQUEST);
    pending.drain(..n).collect()
}

/// Sends a close frame (bounded wait); false when the socket is gone.
async fn send_close(ws: &mut WebSocket, code: u16, reason: &'static str) -> bool {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    matches!(
        tokio::time::timeout(CLOSE_WAIT, ws.send(frame)).await,
        Ok(Ok(()))
    )
}

async fn linger(closing: Option<Instant>) {
    match closing {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes `first` and whatever else is queued, then flushes once.
async fn write_burst(
    ws: &mut WebSocket,
    rx: &mut mpsc::Receiver<Message>,
    first: Message,
) -> Result<(), axum::Error> {
    ws.feed(first).await?;
    for _ in 0..64 {
        match rx.try_recv() {
            Ok(m) => ws.feed(m).await?,
            Err(_) => break,
        }
    }
    ws.flush().await
}

async fn in_flight(
    inflight: &mut Option<(BoxFuture<'static, Result<(), String>>, usize)>,
) -> Result<(), String> {
    match inflight {
        Some((fut, _)) => fut.await,
        None => std::future::pending().await,
    }
}

async fn expiry_sleep(expires_at: Option<u64>) {
    match expires_at {
        Some(exp) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            tokio::time::sleep(Duration::from_secs(exp.saturating_sub(now))).await;
        }
        None => std::future::pending().await,
    }
}

/// Unix time in seconds, as `message_delivered_at`.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Turns a client frame into notifications (one per channel of the socket), or an error
/// frame for the client.
fn accept(
    gw: &Gateway,
    grant: &Grant,
    text: &str,
    pending: &mut VecDeque<Pending>,
) -> Option<Message> {
    if !grant.mode.can_write() {
        return Some(refuse(
            gw,
            "read_only",
            "this socket is read-only (token mode \"r\")",
        ));
    }
    if text.contains('\0') {
        return Some(refuse(
            gw,
            "nul_character",
            "message refused: PostgreSQL text cannot hold NUL characters",
        ));
    }
    let at = unix_now();
    // One trace per client message: this span, the gateway's publish, the bridge's batch and
    // NOTIFY. It ends when the message has been handed to the database (or given up).
    let span = tracing::info_span!(
        target: TRACE,
        "gateway.receive",
        otel.kind = "server",
        messaging.system = "websocket",
        messaging.destination.name = %grant.channels.join(","),
        messaging.message.body.size = text.len(),
        trace_id = tracing::field::Empty,
    );
    telemetry::mark(&span);
    let mut notes = Vec::with_capacity(grant.channels.len());
    for channel in &grant.channels {
        let payload = Envelope::new(WEBSOCKET_MESSAGE, channel, text, &grant.claims, at).to_json();
        if payload.len() > MAX_NOTIFY_PAYLOAD {
            let why = format!(
                "message too large: its envelope is {} bytes and PostgreSQL NOTIFY allows at most {MAX_NOTIFY_PAYLOAD}",
                payload.len()
            );
            return Some(refuse(gw, "too_large", &why));
        }
        notes.push(Pending {
            note: Notification {
                id: Some(gw.message_id()),
                channel: gw.config.listen_channel.clone(),
                payload,
            },
            span: span.clone(),
        });
    }
    gw.metrics.messages_in.inc();
    gw.metrics.bytes_in.inc_by(text.len() as u64);
    pending.extend(notes);
    None
}

fn refuse(gw: &Gateway, reason: &'static str, text: &str) -> Message {
    gw.metrics
        .messages_refused
        .get_or_create(&[("reason", reason)])
        .inc();
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
