//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`; see `docs/security.md`), not
//! an API: hidden from the documentation, and the only door they have into the gateway.
//!
//! [`handshake`] runs exactly what a websocket handshake runs before anything is asked of a
//! bridge or of NATS: the request target and headers read as hyper hands them over, the path
//! routed to its protocol ([`crate::protocol::request`]), and for a socket on channels the
//! token verified and the channel rules applied ([`crate::protocol::channel_grant`]), for a
//! `/live` socket its token verified. [`live_frame`] runs `/live`'s request parser on a client
//! frame. The answers are plain data, so the targets can check what was decided without the
//! gateway's types being public.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use pgws_auth::Authorizer;

use crate::protocol::{channel_grant, live, request, ChannelGrant, Request};
use crate::DirectChannels;

/// What the gateway decided for a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// A wspubsub publisher, before its key is checked by a bridge.
    Publish {
        apikey: String,
        domain: String,
        topic: String,
    },
    /// A wspubsub subscriber, before the leader is asked about the topic.
    Subscribe { domain: String, topic: String },
    /// A `/live` socket whose token was accepted.
    Live {
        /// When the socket is closed for its token's expiry (unix seconds).
        expires_at: Option<u64>,
    },
    /// A socket on channels whose token was accepted.
    Channels {
        /// postgrest-ws direct channel (else postgres-websockets).
        direct: bool,
        channels: Vec<String>,
        /// The `Sec-WebSocket-Protocol` answer, when the token was offered there.
        subprotocol: Option<String>,
        /// When the socket is closed for its token's expiry (unix seconds).
        expires_at: Option<u64>,
    },
    /// Refused: the HTTP status and the metric's reason.
    Refused { status: u16, reason: &'static str },
}

/// The handshake of a request for `target` (the request line's target) with `headers`,
/// tokens verified with `authorizer` at `now` (unix seconds). `None` when hyper would have
/// refused the request before the gateway saw it (a target that is not a URI); header pairs
/// hyper would refuse are left out.
pub fn handshake(
    target: &[u8],
    headers: &[(&[u8], &[u8])],
    authorizer: &Authorizer,
    direct: &DirectChannels,
    now: u64,
) -> Option<Handshake> {
    let uri = Uri::try_from(target).ok()?;
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    let refused = |r: crate::protocol::Refusal| Handshake::Refused {
        status: r.status.as_u16(),
        reason: r.reason,
    };
    let decided = match request(uri.path(), uri.query(), &map) {
        Err(r) => refused(r),
        Ok(Request::Publish { apikey, topic }) => Handshake::Publish {
            apikey,
            domain: topic.domain,
            topic: topic.topic,
        },
        Ok(Request::Subscribe(topic)) => Handshake::Subscribe {
            domain: topic.domain,
            topic: topic.topic,
        },
        Ok(Request::Live(creds)) => match live::verify(authorizer, &creds, now) {
            Err(r) => refused(r),
            Ok((_, expires_at)) => Handshake::Live { expires_at },
        },
        Ok(Request::Channels(creds)) => match channel_grant(authorizer, direct, &creds, now) {
            Err(r) => refused(r),
            Ok(ChannelGrant::Pgws(grant)) => Handshake::Channels {
                direct: false,
                channels: grant.channels,
                subprotocol: creds.protocol,
                expires_at: grant.expires_at,
            },
            Ok(ChannelGrant::Direct(verified, channel)) => Handshake::Channels {
                direct: true,
                channels: vec![channel],
                subprotocol: creds.protocol,
                expires_at: verified.expires_at,
            },
        },
    };
    Some(decided)
}

/// A `/live` client frame the gateway read as a request.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveRequest {
    /// The method as the client spelled it.
    pub name: String,
    /// The `ok:true` reply to it (with empty data).
    pub ok_reply: String,
    /// The `ok:false` reply to it.
    pub error_reply: String,
    /// Its `topicName` list, as `subscribe` and `unsubscribe` read it.
    pub topics: Result<Vec<String>, String>,
    /// Its one topic, as the other methods read it (`name`, else `topicName`).
    pub topic: Result<String, String>,
}

/// Most bytes of JSON a `/live` request's `id` may take; a larger one is refused, not echoed.
pub const LIVE_MAX_ID: usize = live::request::MAX_ID;

/// What `/live` makes of a client frame: a request, or the `ok:false` reply the client gets.
pub fn live_frame(text: &str) -> Result<LiveRequest, String> {
    let request = live::request::parse(text).map_err(|bad| bad.reply())?;
    Ok(LiveRequest {
        name: request.name.clone(),
        ok_reply: request.ok(serde_json::json!({})),
        error_reply: request.error("refused"),
        topics: request.topics(),
        topic: request.topic(&["name", "topicName"]),
    })
}
