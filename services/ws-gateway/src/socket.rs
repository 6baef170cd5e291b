//! One websocket, from its accepted handshake to its close: the socket core every protocol
//! runs on.
//!
//! A single task per socket multiplexes: messages queued by the hub (written in batches, one
//! flush per burst), frames from the client (read only while the pending queue has room:
//! back-pressure; each handed to the socket's protocol module, which says what to do with
//! it), the one NOTIFY request in flight, pings, the token's expiry and the kick (slow
//! consumer, a closed topic, or shutdown). On the way out every accepted frame is still handed
//! to a bridge, and the protocol's closing notification (`ConnectionClose`) is sent.
//!
//! A socket ends with a close frame when one can go out within a second; otherwise (its client
//! stopped reading, or answers no ping) its connection is reset, so that neither its task nor
//! the kernel keeps what it could not write.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::future::BoxFuture;
use futures::SinkExt;
use pgws_bus::Headers as HeaderMap;
use pgws_proto::headers;
use tokio::time::{Interval, Sleep};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::hub::{Kick, Queued};
use crate::limits::{Rate, Slot};
use crate::protocol::{Action, Frame, Protocol};
use crate::queue;
use crate::session::{Accepted, Membership, Session};
use crate::transport::Reset;
use crate::uplink::Pending;
use crate::Gateway;

/// Close code postgres-websockets uses when the token expires.
const CLOSE_JWT_EXPIRED: u16 = 3001;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INVALID_DATA: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
/// How long a close frame may take to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a socket closed by shutdown is still read for what its client sent before it saw
/// the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Everything a socket's task owns, in one allocation: the task's future then holds little more
/// than a pointer to it, whatever it awaits. (A future keeps an `async fn`'s arguments beside
/// the locals they are moved into, so passed by value they would count twice, for every socket.)
pub(crate) struct Socket {
    gw: Arc<Gateway>,
    /// Taken at the end, so the connection closes before what is pending goes to a bridge.
    ws: Option<WebSocket>,
    reset: Reset,
    protocol: Box<dyn Protocol>,
    rx: queue::Receiver<Queued>,
    kick: Kick,
    membership: Membership,
    pending: VecDeque<Pending>,
    /// The NOTIFY request on its way, and how many messages it holds.
    inflight: Option<(BoxFuture<'static, Result<(), String>>, usize)>,
    rate: Option<Rate>,
    expiry: Option<Pin<Box<Sleep>>>,
    ping: Interval,
    _owned: Owned,
}

/// Released when a socket ends: its place in shutdown's count and its address's slot.
pub(crate) type Owned = (TaskTrackerToken, Option<Slot>);

/// An accepted handshake waiting for its upgrade, boxed for the same reason as [`Socket`].
pub(crate) struct Upgrading {
    pub(crate) accepted: Accepted,
    pub(crate) reset: Reset,
    pub(crate) owned: Owned,
}

impl Socket {
    /// The socket of an upgraded connection.
    pub(crate) fn new(upgrading: Box<Upgrading>, ws: WebSocket) -> Box<Self> {
        let Upgrading {
            accepted: Accepted {
                membership,
                session,
            },
            reset,
            owned,
        } = *upgrading;
        let Session {
            protocol,
            rx,
            kick,
            expires_at,
            opening,
        } = session;
        let gw = Arc::clone(&membership.gw);
        let mut ping = tokio::time::interval(gw.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Box::new(Self {
            ws: Some(ws),
            reset,
            protocol,
            rx,
            kick,
            membership,
            pending: opening.into_iter().collect(),
            inflight: None,
            rate: gw.config.max_message_rate.map(Rate::new),
            expiry: expiry_sleep(expires_at),
            ping,
            _owned: owned,
            gw,
        })
    }
}

/// Runs the socket to its end.
pub(crate) async fn run(mut socket: Box<Socket>) {
    drive(&mut socket).await;
    let Socket {
        gw,
        ws,
        protocol,
        pending,
        inflight,
        ..
    } = &mut *socket;
    // The connection closes first; everything accepted still goes to the database, the close
    // event last.
    drop(ws.take());
    pending.extend(protocol.closing(gw));
    if let Some((fut, n)) = inflight.take() {
        if let Err(reason) = fut.await {
            gw.metrics.notify_failed.inc_by(n as u64);
            tracing::warn!(reason, messages = n, "client messages lost after close");
        }
    }
    while !pending.is_empty() {
        let batch = take_batch(pending, gw.uplink.per_request());
        let n = batch.len();
        if let Err(reason) = gw.uplink.send(batch).await {
            gw.metrics.notify_failed.inc_by(n as u64);
            tracing::warn!(reason, messages = n, "client messages lost after close");
        }
    }
}

/// The socket's loop, until it closes; what it accepted and did not send yet is left in
/// `pending` and `inflight`.
async fn drive(socket: &mut Socket) {
    let Socket {
        gw,
        ws,
        reset,
        protocol,
        rx,
        kick,
        membership,
        pending,
        inflight,
        rate,
        expiry,
        ping,
        ..
    } = socket;
    let (gw, kick, reset): (&Gateway, &Kick, &Reset) = (gw, kick, reset);
    let Some(ws) = ws.as_mut() else {
        return;
    };
    let per_request = gw.uplink.per_request();
    ping.tick().await;
    let mut unanswered = 0u32;
    let mut receiving = true;
    // Set once the server sent its close frame on shutdown: frames the client sent before it
    // saw that close are still read and accepted, until its own close or this deadline.
    let mut closing: Option<Pin<Box<Sleep>>> = None;
    // Registered once, not at every turn of the loop (each message wakes the loop).
    let mut kicked = std::pin::pin!(kick.kicked());

    loop {
        if inflight.is_none() && !pending.is_empty() {
            let batch = take_batch(pending, per_request);
            let n = batch.len();
            *inflight = Some((gw.uplink.send(batch), n));
        }
        let open = closing.is_none();
        tokio::select! {
            biased;
            _ = &mut kicked, if open => {
                if let Some((code, reason)) = kick.reason() {
                    send_close(ws, reset, *code, reason).await;
                    break;
                }
                if !send_close(ws, reset, CLOSE_GOING_AWAY, "server shutting down").await {
                    break;
                }
                closing = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
            }
            _ = wait(expiry), if open => {
                send_close(ws, reset, CLOSE_JWT_EXPIRED, "JWT expired").await;
                break;
            }
            _ = wait(&mut closing) => break,
            out = rx.recv(), if open && receiving => {
                // No sender left: the socket reads no channel (write-only).
                let Some(first) = out else {
                    receiving = false;
                    continue;
                };
                if !write(ws, rx, kick, first).await {
                    gw.metrics.abandoned.inc();
                    reset.arm();
                    break;
                }
            }
            result = in_flight(inflight) => {
                let n = inflight.take().map_or(0, |(_, n)| n);
                if let Err(reason) = result {
                    gw.metrics.notify_failed.inc_by(n as u64);
                    tracing::warn!(reason, messages = n, "client messages not delivered to the database");
                    let action = protocol.undelivered(n, &reason);
                    if open && !perform(gw, ws, reset, action, pending, membership).await {
                        break;
                    }
                }
            }
            frame = ws.recv(), if pending.len() < gw.config.max_pending => {
                let frame = match frame {
                    Some(Ok(Message::Text(text))) => Frame::Text(text),
                    Some(Ok(Message::Binary(data))) => Frame::Binary(data),
                    Some(Ok(Message::Pong(_))) => {
                        unanswered = 0;
                        continue;
                    }
                    Some(Ok(Message::Ping(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "socket read failed");
                        if let Some((code, reason, metric)) = refusal(e) {
                            gw.metrics.refused(metric);
                            send_close(ws, reset, code, reason).await;
                        }
                        break;
                    }
                };
                if rate.as_mut().is_some_and(|r| !r.take()) {
                    // What was accepted before still goes to the database (after the loop).
                    gw.metrics.refused("rate_limit");
                    if open {
                        send_close(ws, reset, CLOSE_POLICY, "message rate limit exceeded").await;
                    }
                    break;
                }
                let action = match protocol.frame(gw, frame) {
                    // After our close frame no frame may be sent: refusals are only counted.
                    Action::Reply(_) | Action::Close(..) if !open => Action::None,
                    action => action,
                };
                if !perform(gw, ws, reset, action, pending, membership).await {
                    break;
                }
                if let Some(expires_at) = membership.expiry.take() {
                    *expiry = expiry_sleep(expires_at);
                }
            }
            _ = ping.tick(), if open => {
                // A silent peer may also have stopped reading: what it was sent goes too.
                if unanswered >= 2 {
                    reset.arm();
                    break;
                }
                unanswered += 1;
                if !send(ws, Message::Ping(bytes::Bytes::new())).await {
                    reset.arm();
                    break;
                }
            }
        }
    }
}

/// Writes `first` and whatever else is queued (boxed, like every write: an idle socket's future
/// holds none); false when the socket is given up. A socket kicked while its write is blocked
/// (its client stopped reading) gets one more [`CLOSE_WAIT`], then is dropped: its task and
/// queue go at once, not when the client reads again.
fn write<'a>(
    ws: &'a mut WebSocket,
    rx: &'a mut queue::Receiver<Queued>,
    kick: &'a Kick,
    first: Queued,
) -> BoxFuture<'a, bool> {
    Box::pin(async move {
        let write = write_burst(ws, rx, first);
        tokio::pin!(write);
        tokio::select! {
            biased;
            r = &mut write => r.is_ok(),
            _ = closed_by(kick) => matches!(
                tokio::time::timeout(CLOSE_WAIT, &mut write).await,
                Ok(Ok(()))
            ),
        }
    })
}

/// Sends one frame (boxed, see [`write`]); false when the socket is gone.
fn send(ws: &mut WebSocket, message: Message) -> BoxFuture<'_, bool> {
    Box::pin(async move { ws.send(message).await.is_ok() })
}

/// Resolves when the socket is told to close with a close frame (not on shutdown, whose writes
/// are given their time).
async fn closed_by(kick: &Kick) {
    kick.kicked().await;
    if kick.reason().is_none() {
        std::future::pending::<()>().await;
    }
}

/// The close frame for a read error the client caused: a frame or message over the limit
/// (refused from the frame's header, before its payload), or a text frame that is not UTF-8
/// (RFC 6455 7.4.1: 1007). `None` for the others (the connection is gone).
fn refusal(e: axum::Error) -> Option<(u16, &'static str, &'static str)> {
    match *e.into_inner().downcast::<tungstenite::Error>().ok()? {
        tungstenite::Error::Capacity(_) => Some((CLOSE_TOO_BIG, "message too big", "too_big")),
        tungstenite::Error::Utf8(_) => Some((
            CLOSE_INVALID_DATA,
            "a text frame must be UTF-8",
            "text_not_utf8",
        )),
        _ => None,
    }
}

/// Does what the protocol asked for a client frame; false when the socket is done (closed, or
/// gone). Boxed: a `Many` or an `Await` holds further actions.
fn perform<'a>(
    gw: &'a Gateway,
    ws: &'a mut WebSocket,
    reset: &'a Reset,
    action: Action,
    pending: &'a mut VecDeque<Pending>,
    membership: &'a mut Membership,
) -> BoxFuture<'a, bool> {
    Box::pin(async move {
        match action {
            Action::None => true,
            Action::Notify(notes) => {
                pending.extend(notes);
                true
            }
            Action::Publish {
                subject,
                payload,
                binary,
            } => {
                let mut h = HeaderMap::new();
                if binary {
                    h.insert(headers::FRAME.to_owned(), headers::FRAME_BINARY.to_owned());
                }
                if let Err(e) = gw.client.publish_with_headers(subject, h, payload).await {
                    tracing::warn!(error = %e, "cannot publish a frame");
                }
                true
            }
            Action::Reply(message) => ws.send(message).await.is_ok(),
            Action::Close(code, reason) => {
                send_close(ws, reset, code, &reason).await;
                false
            }
            Action::Join(subject, registration) => {
                if !membership.join(&subject, registration).await {
                    tracing::warn!(
                        subject,
                        "a socket without dynamic subscriptions asked to join"
                    );
                }
                true
            }
            Action::JoinFrom(subject, registration, from) => {
                if !membership.join_from(&subject, registration, from).await {
                    tracing::warn!(subject, "a socket that does not resume asked to resume");
                }
                true
            }
            Action::Leave(subject, registration) => {
                membership.leave(&subject, registration);
                true
            }
            Action::Many(actions) => {
                for action in actions {
                    if !perform(gw, ws, reset, action, pending, membership).await {
                        return false;
                    }
                }
                true
            }
            Action::Expire(expires_at) => {
                membership.expiry = Some(expires_at);
                true
            }
            Action::Await(work) => {
                let action = work.await;
                perform(gw, ws, reset, action, pending, membership).await
            }
        }
    })
}

/// The next request's notifications: the oldest pending, at most `per_request`.
fn take_batch(pending: &mut VecDeque<Pending>, per_request: usize) -> Vec<Pending> {
    let n = pending.len().min(per_request);
    pending.drain(..n).collect()
}

/// Sends a close frame (bounded wait; boxed, see [`write`]); false when it could not go out (the
/// socket is gone, or its client does not read), and then the connection is reset rather than
/// closed.
fn send_close<'a>(
    ws: &'a mut WebSocket,
    reset: &'a Reset,
    code: u16,
    reason: &'a str,
) -> BoxFuture<'a, bool> {
    Box::pin(async move {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
        let sent = matches!(
            tokio::time::timeout(CLOSE_WAIT, ws.send(frame)).await,
            Ok(Ok(()))
        );
        if !sent {
            reset.arm();
        }
        sent
    })
}

/// Writes `first` and whatever else is queued, then flushes once.
async fn write_burst(
    ws: &mut WebSocket,
    rx: &mut queue::Receiver<Queued>,
    first: Queued,
) -> Result<(), axum::Error> {
    // A message's bytes stop counting against the budgets once it is handed to the socket,
    // those of a burst at once.
    let mut written = None;
    ws.feed(first.into_message(&mut written)).await?;
    for _ in 0..64 {
        match rx.try_recv() {
            Some(q) => ws.feed(q.into_message(&mut written)).await?,
            None => break,
        }
    }
    drop(written);
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

/// The sleep until the token's expiry (`None`: it never expires).
fn expiry_sleep(expires_at: Option<u64>) -> Option<Pin<Box<Sleep>>> {
    expires_at.map(|exp| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Box::pin(tokio::time::sleep(Duration::from_secs(
            exp.saturating_sub(now),
        )))
    })
}

/// Resolves when `sleep` ends; never without one.
async fn wait(sleep: &mut Option<Pin<Box<Sleep>>>) {
    match sleep {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}
