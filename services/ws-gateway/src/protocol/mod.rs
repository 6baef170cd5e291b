//! Protocol modules: what differs between the protocols the gateway speaks.
//!
//! The router ([`admit`]) reads what a handshake asks for ([`request`], a pure function of the
//! URL and headers), decides a channel socket's protocol and channels ([`channel_grant`],
//! pure too) and hands the handshake to its module, which authorises (a JWT at once, an API
//! key through a bridge) and says what the socket reads ([`Admission`]). Then the socket core
//! (`socket`, `session`, `hub`, `uplink`) runs it the same way for every protocol: burst
//! writes, pings, the slow-consumer and back-pressure policies, expiry, shutdown, metrics and
//! traces. While the socket runs, the module only turns client frames into [`Action`]s.
//!
//! - [`pgws`]: postgres-websockets, the default (`/<channel>/<jwt>`, `/<jwt>`, ...).
//! - [`direct`]: postgrest-ws direct channels, on the same URLs, for the channels of
//!   `PGWS_DIRECT_CHANNELS`.
//! - [`pubsub`]: wspubsub publishers (`/ws/pub/<apikey>/<domain>/<topic>`) and subscribers
//!   (`/ws/sub/<domain>/<topic>`).
//! - [`live`]: Daptin's `/live` (JSON requests, custom topics), at exactly `/live` (a
//!   postgres-websockets socket on a channel named `live` uses `/live/<jwt>`).
//!
//! A new protocol is a new module here, and a line in [`request`] and in [`admit`].

pub(crate) mod direct;
pub(crate) mod live;
pub(crate) mod pgws;
pub(crate) mod pubsub;

use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::future::BoxFuture;
use pgws_auth::{Authorizer, Grant, Rejection, Verified};
use pgws_proto::{valid_channel, Topic, MAX_PG_CHANNEL};
use pgws_service::telemetry::{self, TARGET as TRACE};

use crate::handshake::{credentials, Credentials};
use crate::limits::Peer;
use crate::presence::Registration;
use crate::resume::{self, Resume, Wrap};
use crate::uplink::Pending;
use crate::{DirectChannels, Gateway};

/// A data frame from the client.
pub(crate) enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    /// The frame's text: a text frame, or a binary frame holding UTF-8.
    pub(crate) fn as_text(&self) -> Option<&str> {
        match self {
            Frame::Text(text) => Some(text.as_str()),
            Frame::Binary(data) => std::str::from_utf8(data).ok(),
        }
    }
}

/// What the core does with a client frame.
pub(crate) enum Action {
    /// Nothing (ignored, or only counted).
    None,
    /// Notifications for the database, in order.
    Notify(Vec<Pending>),
    /// A frame for everyone reading `subject` (wspubsub); awaited, so a publisher faster than
    /// NATS is slowed down, not buffered.
    Publish {
        subject: String,
        payload: Bytes,
        binary: bool,
    },
    /// A frame back to the client.
    Reply(Message),
    /// Close the socket with this close frame.
    Close(u16, String),
    /// Start reading a fan-out subject (a socket admitted with `dynamic`), and register what
    /// the leader must know of it; the actions after it run once both are done.
    Join(String, Option<Registration>),
    /// [`Action::Join`] through the history (a socket admitted with `resume`), from this
    /// point: what was kept after it is queued first.
    JoinFrom(String, Option<Registration>, Resume),
    /// Stop reading a fan-out subject, and release its registration.
    Leave(String, Option<Registration>),
    /// Several actions, in order.
    Many(Vec<Action>),
    /// The socket's token was replaced: it now expires then (unix seconds; `None`: never).
    Expire(Option<u64>),
    /// Work that needs an answer from elsewhere (a bridge): awaited before the socket's next
    /// frame is read, so a socket's requests are answered in order; the future bounds its own
    /// time.
    Await(BoxFuture<'static, Action>),
}

/// A socket's protocol once its handshake was accepted.
pub(crate) trait Protocol: Send + 'static {
    /// Turns a client frame into work for the core.
    fn frame(&mut self, gw: &Gateway, frame: Frame) -> Action;

    /// What the client is told when `n` of its messages could not be handed to the database.
    fn undelivered(&self, n: usize, reason: &str) -> Action;

    /// A notification for the database when the socket ends (the meta channel's
    /// `ConnectionClose`).
    fn closing(&mut self, _gw: &Gateway) -> Option<Pending> {
        None
    }
}

/// What a module asks of the core for an authorised socket.
pub(crate) struct Admission {
    /// The `protocol` label of the connection metrics.
    pub(crate) label: &'static str,
    /// Fan-out subjects the socket reads.
    pub(crate) subjects: Vec<String>,
    /// What the leader must know while the socket lives; a direct channel is LISTENed before
    /// the handshake completes.
    pub(crate) registrations: Vec<Registration>,
    /// The socket gets gap signals.
    pub(crate) gaps: bool,
    /// The socket joins and leaves subjects while it runs ([`Action::Join`]).
    pub(crate) dynamic: bool,
    /// Messages its send queue holds, when not `PGWS_SEND_QUEUE` (bursts that are normal for
    /// the protocol).
    pub(crate) send_queue: Option<usize>,
    /// When the token expires (unix seconds): the socket is closed with 3001.
    pub(crate) expires_at: Option<u64>,
    /// A notification sent first (the meta channel's `ConnectionOpen`).
    pub(crate) opening: Option<Pending>,
    pub(crate) protocol: Box<dyn Protocol>,
    /// The socket reads its subjects through the history, from this point, framed this way
    /// (`?resume`: postgres-websockets and direct sockets).
    pub(crate) resume: Option<(Resume, Wrap)>,
    /// A check that must pass once the socket reads its subjects, before the handshake
    /// completes (a wspubsub subscriber: does its topic exist?); what it answers is registered
    /// with the leader, a refusal ends the handshake and releases the socket.
    pub(crate) after_join: Option<AfterJoin>,
}

/// See [`Admission::after_join`].
pub(crate) type AfterJoin = BoxFuture<'static, Result<Option<Registration>, Refusal>>;

/// Claims every token may change on an in-band refresh: its times and its id.
pub(crate) const REFRESH_TIMES: [&str; 4] = ["exp", "iat", "nbf", "jti"];

/// Whether a refreshed token's claims equal the socket's, apart from `REFRESH_TIMES` and
/// `also` (claims the protocol checks itself).
pub(crate) fn same_claims_apart_from(
    new: &serde_json::Map<String, serde_json::Value>,
    old: &serde_json::Map<String, serde_json::Value>,
    also: &[&str],
) -> bool {
    let ignored = |k: &String| REFRESH_TIMES.contains(&k.as_str()) || also.contains(&k.as_str());
    let new_kept = new.iter().filter(|(k, _)| !ignored(k));
    let old_kept = old.iter().filter(|(k, _)| !ignored(k));
    new_kept.eq(old_kept)
}

/// A refused handshake: the status and the body the client gets, and the metric's reason.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) reason: &'static str,
    pub(crate) body: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, reason: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            body: body.into(),
        }
    }

    /// HTTP 400 with the reference's text for a refused token.
    pub(crate) fn token(rejection: &Rejection) -> Self {
        let reason = match rejection {
            Rejection::Expired => "expired",
            Rejection::MissingMode => "missing_mode",
            Rejection::InvalidMode => "invalid_mode",
            Rejection::NoAllowedChannels => "no_allowed_channels",
            Rejection::Invalid(_) => "invalid_token",
        };
        Self::new(StatusCode::BAD_REQUEST, reason, rejection.to_string())
    }
}

/// What a handshake asks for, read from its URL and headers alone (before any token,
/// key or bridge is consulted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// `/ws/pub/<apikey>/<domain>/<topic>`: the key percent-decoded, at most
    /// [`pgws_proto::MAX_APIKEY`] bytes.
    Publish { apikey: String, topic: Topic },
    /// `/ws/sub/<domain>/<topic>`.
    Subscribe(Topic),
    /// `/live`: Daptin's protocol, authorised by a token.
    Live(Credentials),
    /// Any other path: a socket on channels, authorised by a token.
    Channels(Credentials),
}

/// Reads what a handshake for `path` and `query` with `headers` asks for; refuses a
/// malformed wspubsub path.
pub(crate) fn request(
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Request, Refusal> {
    if let Some(rest) = path.strip_prefix("/ws/pub/") {
        let (apikey, topic) = pubsub::publisher_path(rest)?;
        return Ok(Request::Publish { apikey, topic });
    }
    if let Some(rest) = path.strip_prefix("/ws/sub/") {
        return pubsub::subscriber_path(rest).map(Request::Subscribe);
    }
    let creds = credentials(path, query, headers);
    if path == "/live" || path == "/live/" {
        return Ok(Request::Live(creds));
    }
    Ok(Request::Channels(creds))
}

/// The router: authorises the handshake of `parts` with the module its path belongs to; the
/// socket is registered by [`Gateway::accept`](crate::Gateway) with what it answers.
pub(crate) async fn admit(gw: &Arc<Gateway>, parts: &Parts) -> Result<Admission, Refusal> {
    match request(parts.uri.path(), parts.uri.query(), &parts.headers)? {
        Request::Publish { apikey, topic } => {
            let peer = parts.extensions.get::<Peer>().map(|p| p.0);
            pubsub::publisher(gw, peer, &apikey, topic).await
        }
        Request::Subscribe(topic) => Ok(pubsub::subscriber(gw, topic)),
        Request::Live(creds) => {
            settle(gw, &creds).await;
            live::admission(gw, &creds)
        }
        Request::Channels(creds) => {
            let from = resume::requested(parts.uri.query())?;
            if from.is_some() && gw.hub.history.is_none() {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "no_history",
                    "Error: this server keeps no history to resume from (PGWS_HISTORY_SECONDS=0)",
                ));
            }
            settle(gw, &creds).await;
            channel_socket(gw, &creds, from)
        }
    }
}

/// With keys from a JWKS URL, a token naming a key id not fetched yet waits (briefly) for a
/// refresh that may bring it.
async fn settle(gw: &Gateway, creds: &Credentials) {
    if let (Some(jwks), Some(token)) = (&gw.jwks, creds.token.as_deref()) {
        jwks.settle(&gw.config.authorizer, token).await;
    }
}

/// The subprotocol to answer for a handshake at `parts` (a token offered there).
pub(crate) fn selected_protocol(parts: &Parts) -> Option<String> {
    credentials(parts.uri.path(), parts.uri.query(), &parts.headers).protocol
}

/// Which protocol serves a socket on channels, and on which channels.
#[derive(Debug)]
pub(crate) enum ChannelGrant {
    /// postgres-websockets, on the grant's channels (each valid, none direct).
    Pgws(Grant),
    /// A postgrest-ws direct channel (valid, one of `PGWS_DIRECT_CHANNELS`).
    Direct(Verified, String),
}

/// The decision of a channel socket's handshake, without side effects: the token verified at
/// `now` (unix seconds), then the channel. As in postgrest-ws, a `channel` claim naming a
/// direct channel wins over the path; otherwise the postgres-websockets rules pick the
/// socket's channels, and a direct channel among them must be the only one. Every channel
/// returned is a valid PostgreSQL channel name.
pub(crate) fn channel_grant(
    authorizer: &Authorizer,
    direct: &DirectChannels,
    creds: &Credentials,
    now: u64,
) -> Result<ChannelGrant, Refusal> {
    let Some(token) = creds.token.as_deref() else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "missing_token",
            "Error: missing token",
        ));
    };
    let verified = authorizer
        .verify(token, now)
        .map_err(|r| Refusal::token(&r))?;
    if let Some(channel) = verified.channel_claim().filter(|c| direct.contains(c)) {
        let channel = channel.to_owned();
        if !valid_channel(&channel) {
            return Err(invalid_channel());
        }
        return Ok(ChannelGrant::Direct(verified, channel));
    }
    let grant = verified
        .grant(creds.channel.as_deref())
        .map_err(|r| Refusal::token(&r))?;
    // A channel is a PostgreSQL identifier; bounding it also bounds every subject built
    // from it (NATS refuses long control lines, and would drop this gateway's connection).
    if grant.channels.iter().any(|c| !valid_channel(c)) {
        return Err(invalid_channel());
    }
    if !grant.channels.iter().any(|c| direct.contains(c)) {
        return Ok(ChannelGrant::Pgws(grant));
    }
    match <[String; 1]>::try_from(grant.channels) {
        Ok([channel]) => {
            let verified = Verified {
                mode: grant.mode,
                claims: grant.claims,
                expires_at: grant.expires_at,
            };
            Ok(ChannelGrant::Direct(verified, channel))
        }
        Err(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "mixed_channels",
            "Error: a direct channel cannot share a socket with other channels",
        )),
    }
}

fn invalid_channel() -> Refusal {
    Refusal::new(
        StatusCode::BAD_REQUEST,
        "invalid_channel",
        format!("Error: a channel name is 1 to {MAX_PG_CHANNEL} bytes without NUL"),
    )
}

/// A socket on channels: postgres-websockets, or direct when its channel is one of
/// `PGWS_DIRECT_CHANNELS`; resuming from `from` when it asked to.
fn channel_socket(
    gw: &Gateway,
    creds: &Credentials,
    from: Option<Resume>,
) -> Result<Admission, Refusal> {
    let config = &gw.config;
    let (mut admission, wrap) =
        match channel_grant(&config.authorizer, &config.direct, creds, unix_secs())? {
            ChannelGrant::Pgws(grant) => (pgws::admission(gw, grant), Wrap::Json),
            ChannelGrant::Direct(verified, channel) => {
                (direct::admission(gw, verified, channel)?, Wrap::Text)
            }
        };
    admission.resume = from.map(|from| (from, wrap));
    Ok(admission)
}

/// The span of one client message (`gateway.receive`): the first of its trace, ended when the
/// message has been handed to the database (or given up). Disabled when traces are off.
pub(crate) fn receive_span(destination: &str, size: usize) -> tracing::Span {
    let span = tracing::info_span!(
        target: TRACE,
        "gateway.receive",
        otel.kind = "server",
        messaging.system = "websocket",
        messaging.destination.name = %destination,
        messaging.message.body.size = size,
        trace_id = tracing::field::Empty,
    );
    telemetry::mark(&span);
    span
}

/// Unix time in seconds.
pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(domain: &str, topic: &str) -> Topic {
        Topic {
            domain: domain.to_owned(),
            topic: topic.to_owned(),
        }
    }

    #[test]
    fn paths_route_to_their_protocol() {
        let none = HeaderMap::new();
        let publish = Request::Publish {
            apikey: "k 1".to_owned(),
            topic: topic("d", "t"),
        };
        assert_eq!(
            request("/ws/pub/k%201/d/t", None, &none).ok(),
            Some(publish)
        );
        assert_eq!(
            request("/ws/sub/d/t", None, &none).ok(),
            Some(Request::Subscribe(topic("d", "t")))
        );
        let Ok(Request::Channels(creds)) = request("/chat/a.b.c", Some("x=1"), &none) else {
            panic!("a channel socket");
        };
        assert_eq!(
            (creds.channel.as_deref(), creds.token.as_deref()),
            (Some("chat"), Some("a.b.c"))
        );
        let refused = request("/ws/pub/k/d", None, &none).expect_err("two segments");
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    }
}
