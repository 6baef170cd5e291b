//! Resuming sockets: a postgres-websockets or direct socket that asks with `?resume=` (from
//! now) or `?resume=<position>` (from after it) reads its subjects through the stack's history
//! (`pgws_bus::History`), and every message frame it gets is
//! `{"position":"<position>","message":<message>}` ([`Wrap`]).
//!
//! How replay and live messages join without a gap or a repeat: the socket first joins the
//! history's tail of each subject (the hub's resume entry) with a [`Hold`] that keeps what
//! comes meanwhile; then the replay queues everything kept after the position, merged in
//! sequence order, waiting for room in the socket's queue; then the holds are released
//! together: held messages after the last one replayed of their subject go to the queue in
//! sequence order, and from then on a message at or before that sequence (a tail running
//! behind the replay) is dropped. Every message after the position is either replayed or
//! comes through the tail after the socket joined it, so each is queued once.
//!
//! A position that cannot be served (older than what is kept, not issued by this stack's
//! history) gets `{"event":"Gap","reason":"history"}` first, then live messages. When the
//! history fails during a replay or a tail ends, the socket is closed with 1012 so that its
//! client resumes again from its last position.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use axum::http::StatusCode;
use futures::StreamExt;
use pgws_bus::{format_position, parse_position, replay_all, Replay};

use crate::hub::{Subscriber, CLOSE_RESTART};
use crate::protocol::Refusal;
use crate::Gateway;

/// What a resuming socket asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resume {
    /// `?resume=`: positions from now on.
    Now,
    /// `?resume=<position>`: what was kept after it, then live messages.
    After { epoch: String, seq: u64 },
}

/// The `resume` parameter of a handshake's query: `None` without one, a refusal (400) when
/// its value is not a position.
pub(crate) fn requested(query: Option<&str>) -> Result<Option<Resume>, Refusal> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == "resume").then_some(v)
        })
    else {
        return Ok(None);
    };
    if value.is_empty() {
        return Ok(Some(Resume::Now));
    }
    let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
    match parse_position(&decoded) {
        Some((epoch, seq)) => Ok(Some(Resume::After {
            epoch: epoch.to_owned(),
            seq,
        })),
        None => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_position",
            "Error: resume is not a position (leave it empty to start from now)",
        )),
    }
}

/// How a kept message is framed for a resuming socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Wrap {
    /// postgres-websockets: the notification is JSON and goes in as its value (as a string
    /// if it is not JSON).
    Json,
    /// A direct channel: the payload as a JSON string.
    Text,
    /// A `/live` event (a JSON object): the position goes in as its first member,
    /// `{"position":"<position>","type":"event",...}`.
    Event,
}

impl Wrap {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Wrap::Json => "json",
            Wrap::Text => "text",
            Wrap::Event => "event",
        }
    }

    /// `{"position":"<position>","message":<payload>}` (an event: the event with its
    /// position); `None` when the payload is not UTF-8.
    pub(crate) fn frame(self, position: &str, payload: &[u8]) -> Option<Utf8Bytes> {
        let text = std::str::from_utf8(payload).ok()?;
        if self == Wrap::Event {
            let position = serde_json::Value::String(position.to_owned());
            let rest = text.trim_start().strip_prefix('{')?.trim_start();
            let sep = if rest.starts_with('}') { "" } else { "," };
            return Some(Utf8Bytes::from(format!(
                "{{\"position\":{position}{sep}{rest}"
            )));
        }
        let json =
            self == Wrap::Json && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
        let message = if json {
            text.trim().to_owned()
        } else {
            serde_json::Value::String(text.to_owned()).to_string()
        };
        let position = serde_json::Value::String(position.to_owned());
        Some(Utf8Bytes::from(format!(
            "{{\"position\":{position},\"message\":{message}}}"
        )))
    }
}

/// What one resuming socket's subject holds back while its replay runs.
#[derive(Debug)]
pub(crate) struct Hold {
    state: Mutex<HoldState>,
    /// Most messages held; beyond, the socket is a slow consumer.
    max: usize,
}

#[derive(Debug)]
struct HoldState {
    holding: bool,
    held: Vec<(u64, Message)>,
    /// Messages at or before this sequence were replayed: dropped when they come.
    floor: u64,
}

impl Hold {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HoldState {
                holding: true,
                held: Vec::new(),
                floor: 0,
            }),
            max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues message `seq` to `sub`, holds it while the replay runs, or drops it when the
    /// replay had it. True when queued or held.
    pub(crate) fn offer(
        &self,
        sub: &Subscriber,
        seq: u64,
        message: Message,
        slow: &mut u64,
        spent: &mut u64,
    ) -> bool {
        let mut state = self.lock();
        if seq <= state.floor {
            return false;
        }
        if state.holding {
            if state.held.len() >= self.max {
                if !sub.kick.is_kicked() {
                    *slow += 1;
                    sub.kick
                        .close(1008, "slow consumer: too much arrived while resuming");
                }
                return false;
            }
            state.held.push((seq, message));
            return true;
        }
        // Queued under the lock, so a release and a live message keep their order.
        sub.offer(message, slow, spent)
    }
}

/// Releases `holds` together, each with the last sequence replayed of its subject: what they
/// held after it goes to `sub` in sequence order, then live messages go straight.
fn release(holds: &[(Arc<Hold>, u64)], sub: &Subscriber) {
    let mut guards: Vec<_> = holds.iter().map(|(h, floor)| (h.lock(), *floor)).collect();
    let mut held: Vec<(u64, Message)> = Vec::new();
    for (state, floor) in &mut guards {
        state.holding = false;
        state.floor = *floor;
        held.extend(
            std::mem::take(&mut state.held)
                .into_iter()
                .filter(|(seq, _)| seq > floor),
        );
    }
    held.sort_by_key(|(seq, _)| *seq);
    let (mut slow, mut spent) = (0, 0);
    for (_, message) in held {
        sub.offer(message, &mut slow, &mut spent);
    }
    drop(guards);
}

/// A resuming socket's subjects and their holds, from its admission to its replay.
pub(crate) struct Resuming {
    pub(crate) from: Resume,
    pub(crate) wrap: Wrap,
    pub(crate) holds: Vec<(String, Arc<Hold>)>,
}

/// Serves a resuming socket what it missed, then lets its live messages through (see the
/// module's doc). Runs as the socket's companion task; ends early when the socket is gone.
pub(crate) async fn replay(gw: Arc<Gateway>, resuming: Resuming, sub: Subscriber) {
    let Resuming { from, wrap, holds } = resuming;
    let Resume::After { epoch, seq: after } = from else {
        release(&floors(&holds, &[]), &sub);
        return;
    };
    let Some(history) = gw.hub.history.clone() else {
        return;
    };
    let subjects: Vec<String> = holds.iter().map(|(s, _)| s.clone()).collect();
    let mut stream = match replay_all(history.as_ref(), &subjects, &epoch, after).await {
        Ok(Replay::Kept(stream)) => stream,
        Ok(Replay::Gap) => {
            gw.metrics
                .resumes
                .get_or_create(&[("outcome", "gap")])
                .inc();
            let gap = serde_json::json!({"event": "Gap", "reason": "history"}).to_string();
            let (mut slow, mut spent) = (0, 0);
            sub.offer(Message::Text(Utf8Bytes::from(gap)), &mut slow, &mut spent);
            release(&floors(&holds, &[]), &sub);
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot replay the history");
            sub.kick
                .close(CLOSE_RESTART, "history unavailable: try again");
            return;
        }
    };
    let mut last: Vec<(String, u64)> = subjects.iter().map(|s| (s.clone(), after)).collect();
    let mut replayed = 0u64;
    // A socket that ended (or is being closed) needs no more of its replay.
    let gone = |sub: &Subscriber| sub.kick.is_kicked() || sub.tx.is_closed();
    while let Some(kept) = stream.next().await {
        let kept = match kept {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(error = %e, "the history's replay failed");
                sub.kick
                    .close(CLOSE_RESTART, "history interrupted: resume again");
                return;
            }
        };
        while sub.busy() {
            if gone(&sub) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if gone(&sub) {
            return;
        }
        let position = format_position(&epoch, kept.seq);
        if let Some(text) = wrap.frame(&position, &kept.payload) {
            let (mut slow, mut spent) = (0, 0);
            sub.offer(Message::Text(text), &mut slow, &mut spent);
            replayed += 1;
        }
        if let Some(entry) = last.iter_mut().find(|(s, _)| *s == kept.subject) {
            entry.1 = kept.seq;
        }
    }
    gw.metrics
        .resumes
        .get_or_create(&[("outcome", "recovered")])
        .inc();
    gw.metrics.replayed.inc_by(replayed);
    let floors = floors(&holds, &last);
    release(&floors, &sub);
}

/// Each hold with the last sequence replayed of its subject (0 when none was).
fn floors(holds: &[(String, Arc<Hold>)], last: &[(String, u64)]) -> Vec<(Arc<Hold>, u64)> {
    holds
        .iter()
        .map(|(subject, hold)| {
            let floor = last
                .iter()
                .find(|(s, _)| s == subject)
                .map_or(0, |(_, seq)| *seq);
            (Arc::clone(hold), floor)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_is_absent_empty_or_a_position() {
        assert_eq!(requested(None).ok(), Some(None));
        assert_eq!(requested(Some("token=x")).ok(), Some(None));
        assert_eq!(requested(Some("resume=")).ok(), Some(Some(Resume::Now)));
        assert_eq!(
            requested(Some("token=x&resume")).ok(),
            Some(Some(Resume::Now))
        );
        assert_eq!(
            requested(Some("resume=1f-00000000000a")).ok(),
            Some(Some(Resume::After {
                epoch: "1f".to_owned(),
                seq: 10
            }))
        );
        let bad = requested(Some("resume=yesterday")).expect_err("not a position");
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn frames_carry_the_position_and_the_message() {
        let json = Wrap::Json.frame("1-01", br#"{"a":1}"#).expect("utf-8");
        assert_eq!(json.as_str(), r#"{"position":"1-01","message":{"a":1}}"#);
        let not_json = Wrap::Json.frame("1-01", b"plain").expect("utf-8");
        assert_eq!(
            not_json.as_str(),
            r#"{"position":"1-01","message":"plain"}"#
        );
        let event = Wrap::Event
            .frame("1-01", br#"{"type":"event"}"#)
            .expect("utf-8");
        assert_eq!(event.as_str(), r#"{"position":"1-01","type":"event"}"#);
        let empty = Wrap::Event.frame("1-01", b"{}").expect("utf-8");
        assert_eq!(empty.as_str(), r#"{"position":"1-01"}"#);
        assert!(Wrap::Event.frame("1-01", b"[1]").is_none());
        let text = Wrap::Text.frame("1-01", br#"{"a":1}"#).expect("utf-8");
        assert_eq!(
            text.as_str(),
            r#"{"position":"1-01","message":"{\"a\":1}"}"#
        );
        assert!(Wrap::Text.frame("1-01", &[0xff]).is_none());
    }
}
