//! wspubsub: an API-key pub/sub hub.
//!
//! - `/ws/pub/<apikey>/<domain>/<topic>`: a bridge checks the key against the `apikeys` table
//!   (refused: 403, and nothing is created), then the leader's registry grants the topic (one
//!   publisher per topic across the stack; a second gets 409). Its frames, text and binary, go
//!   verbatim and in order to every subscriber on every gateway.
//! - `/ws/sub/<domain>/<topic>`: no key; a topic without a publisher (nor one within its grace
//!   period) is refused with 404. Subscribers' frames are ignored.
//!
//! An address whose keys were refused three times in a row waits before its next key is
//! checked (250 ms, doubling with each further refusal, at most 60 s; answered 429 meanwhile,
//! without asking a bridge): see `limits::KeyRefusals`.
//!
//! When the publisher leaves, another may take the topic over within `PGWS_PUBSUB_GRACE`; the
//! subscribers stay connected meanwhile, and after it the leader closes them (close code 4004).
//! A connection belongs to one topic.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use percent_encoding::percent_decode_str;
use pgws_proto::{
    Ack, KeyCheck, RegistryOp, RegistryReply, Topic, MAX_APIKEY, MAX_DOMAIN, MAX_TOPIC,
};

use super::{Action, Admission, Frame, Protocol, Refusal};
use crate::presence::Registration;
use crate::Gateway;
use std::sync::Arc;

/// How long a handshake waits for a bridge's answer (a leader that just took over asks to
/// retry for a few seconds).
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Pause between retries.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The publisher of a topic.
struct Publisher {
    subject: String,
}

/// A subscriber (its frames are ignored).
struct Subscriber;

impl Protocol for Publisher {
    fn frame(&mut self, gw: &Gateway, frame: Frame) -> Action {
        let (payload, binary) = match frame {
            Frame::Text(text) => (Bytes::from(text), false),
            Frame::Binary(data) => (data, true),
        };
        gw.metrics.accepted(payload.len());
        Action::Publish {
            subject: self.subject.clone(),
            payload,
            binary,
        }
    }

    fn undelivered(&self, _n: usize, _reason: &str) -> Action {
        Action::None
    }
}

impl Protocol for Subscriber {
    fn frame(&mut self, gw: &Gateway, _frame: Frame) -> Action {
        gw.metrics.refused("subscriber_frame");
        Action::None
    }

    fn undelivered(&self, _n: usize, _reason: &str) -> Action {
        Action::None
    }
}

/// Reads `/ws/pub/<apikey>/<domain>/<topic>` (`rest` is what follows `/ws/pub/`): the
/// percent-decoded key and the topic. A key with a NUL is refused here: no key holds one
/// (PostgreSQL text cannot), and the bridge's query would fail on it.
pub(crate) fn publisher_path(rest: &str) -> Result<(String, Topic), Refusal> {
    let [apikey, domain, topic] = segments(rest)?;
    if apikey.is_empty() || apikey.len() > MAX_APIKEY {
        return Err(forbidden());
    }
    let topic = topic_of(domain, topic)?;
    let apikey = decode(apikey);
    if apikey.contains('\0') {
        return Err(forbidden());
    }
    Ok((apikey, topic))
}

/// Reads `/ws/sub/<domain>/<topic>` (`rest` is what follows `/ws/sub/`).
pub(crate) fn subscriber_path(rest: &str) -> Result<Topic, Refusal> {
    let [domain, topic] = segments(rest)?;
    topic_of(domain, topic)
}

/// A publisher with `apikey` for `topic`: the key checked by a bridge, the topic claimed from
/// the leader's registry.
pub(crate) async fn publisher(
    gw: &Arc<Gateway>,
    peer: Option<IpAddr>,
    apikey: &str,
    topic: Topic,
) -> Result<Admission, Refusal> {
    if let Some(wait) = peer.and_then(|ip| gw.key_refusals.waiting(ip)) {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "apikey_backoff",
            format!(
                "too many refused API keys from this address: try again in {} ms",
                wait.as_millis().max(1)
            ),
        ));
    }
    match check_key(gw, apikey, &topic.domain).await {
        Ok(()) => {
            if let Some(ip) = peer {
                gw.key_refusals.accepted(ip);
            }
        }
        Err(refusal) => {
            if let (Some(ip), StatusCode::FORBIDDEN) = (peer, refusal.status) {
                let n = gw.key_refusals.refused(ip);
                // Logged at the first wait and then at each doubling of the count.
                if n == 3 || (n > 3 && n.is_power_of_two()) {
                    tracing::warn!(address = %ip, refused = n, "API keys refused in a row from one address: it waits longer before each new check");
                }
            }
            return Err(refusal);
        }
    }
    let op = RegistryOp::Claim {
        topic: topic.clone(),
    };
    match ask(gw, op).await? {
        RegistryReply::Ok => {}
        RegistryReply::Taken => {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "topic_taken",
                "this topic already has a publisher",
            ))
        }
        other => return Err(unavailable(&format!("unexpected answer {other:?}"))),
    }
    // Granted: the registration hands the topic back when the socket ends.
    Ok(Admission {
        label: "wspubsub-pub",
        subjects: Vec::new(),
        registrations: vec![Registration::Published(topic.clone())],
        gaps: false,
        dynamic: false,
        send_queue: None,
        expires_at: None,
        opening: None,
        protocol: Box::new(Publisher {
            subject: gw.config.nats.subjects.topic(&topic),
        }),
        resume: None,
        after_join: None,
    })
}

/// A subscriber of `topic`, kept when the leader's registry knows the topic.
pub(crate) fn subscriber(gw: &Arc<Gateway>, topic: Topic) -> Admission {
    // Subscribed first, then asked: a topic closed in between closes this socket too. Only
    // a found topic is registered (the leader takes a registered topic it does not know for
    // one whose close was missed).
    let subject = gw.config.nats.subjects.topic(&topic);
    let gw = Arc::clone(gw);
    let found = async move {
        let lookup = RegistryOp::Lookup {
            topic: topic.clone(),
        };
        match ask(&gw, lookup).await? {
            RegistryReply::Ok => Ok(Some(Registration::Subscribed(topic))),
            _ => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "no_topic",
                "no such topic: it has no publisher",
            )),
        }
    };
    Admission {
        label: "wspubsub-sub",
        subjects: vec![subject],
        registrations: Vec::new(),
        gaps: false,
        dynamic: false,
        send_queue: None,
        expires_at: None,
        opening: None,
        protocol: Box::new(Subscriber),
        resume: None,
        after_join: Some(Box::pin(found)),
    }
}

/// Exactly `N` path segments, as written (the callers bound and decode them).
fn segments<const N: usize>(rest: &str) -> Result<[&str; N], Refusal> {
    let parts: Vec<&str> = rest.split('/').collect();
    let parts: [&str; N] = parts.try_into().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "use /ws/pub/<apikey>/<domain>/<topic> or /ws/sub/<domain>/<topic>",
        )
    })?;
    Ok(parts)
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// The percent-decoded domain and topic, bounded; the domain (PostgreSQL text in the key
/// check) without NUL.
fn topic_of(domain: &str, topic: &str) -> Result<Topic, Refusal> {
    let (domain, topic) = (decode(domain), decode(topic));
    let bad_domain = domain.is_empty() || domain.len() > MAX_DOMAIN || domain.contains('\0');
    if bad_domain || topic.is_empty() || topic.len() > MAX_TOPIC {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_topic",
            format!(
                "a domain is 1 to {MAX_DOMAIN} bytes without NUL and a topic 1 to {MAX_TOPIC} bytes"
            ),
        ));
    }
    Ok(Topic { domain, topic })
}

fn forbidden() -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "invalid_apikey",
        "invalid or inactive API key for this domain",
    )
}

fn unavailable(why: &str) -> Refusal {
    tracing::warn!(why, "wspubsub handshake could not be answered");
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the server cannot check this now; try again",
    )
}

/// Asks a bridge whether `apikey` may publish in `domain`.
async fn check_key(gw: &Gateway, apikey: &str, domain: &str) -> Result<(), Refusal> {
    let check = KeyCheck {
        apikey: apikey.to_owned(),
        domain: domain.to_owned(),
    };
    let body = serde_json::to_vec(&check).map_err(|e| unavailable(&e.to_string()))?;
    let subject = gw.config.nats.subjects.apikey();
    let sent = gw.client.request(subject, Bytes::from(body));
    let answer = tokio::time::timeout(ANSWER_WAIT, sent)
        .await
        .map_err(|_| unavailable("no bridge answered the key check"))?
        .map_err(|e| unavailable(&e.to_string()))?;
    let ack: Ack =
        serde_json::from_slice(&answer.payload).map_err(|e| unavailable(&e.to_string()))?;
    match (ack.ok, ack.error) {
        (_, Some(e)) => Err(unavailable(&e)),
        (true, None) => Ok(()),
        (false, None) => Err(forbidden()),
    }
}

/// Asks the leader's registry, retrying while a new leader settles or none answers.
async fn ask(gw: &Gateway, op: RegistryOp) -> Result<RegistryReply, Refusal> {
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    loop {
        let last = match gw.presence.ask(op.clone()).await {
            Ok(RegistryReply::Retry) => "the leader bridge is settling".to_owned(),
            Ok(reply) => return Ok(reply),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
            return Err(unavailable(&last));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_exactly_their_segments() {
        assert!(segments::<3>("k/d/t").is_ok());
        assert!(segments::<3>("k/d").is_err());
        assert!(segments::<3>("k/d/t/x").is_err());
        assert!(segments::<2>("d/t").is_ok());
        assert!(topic_of("d", "").is_err());
        assert!(topic_of(&"d".repeat(65), "t").is_err());
        assert_eq!(topic_of("a%20b", "t").expect("valid").domain, "a b");
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/handshake.rs`): a NUL in a key or a domain
    /// reached the bridge's key query, which PostgreSQL refused: 503 and a warning for each
    /// such handshake instead of a refusal.
    #[test]
    fn keys_and_domains_hold_no_nul() {
        let status = |r: Result<(String, Topic), Refusal>| r.map(|_| ()).map_err(|e| e.status);
        assert_eq!(
            status(publisher_path("k%00/d/t")),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(publisher_path("k/d%00/t")),
            Err(StatusCode::BAD_REQUEST)
        );
        assert!(subscriber_path("d%00/t").is_err());
        assert_eq!(status(publisher_path("k/d/t%00")), Ok(()));
    }
}
