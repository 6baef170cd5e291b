//! Where a handshake's token and channel come from.
//!
//! postgres-websockets reads them from the path only: `/<channel>/<jwt>` or `/<jwt>` (anything
//! after the second segment is ignored). So that tokens can stay out of URLs and proxy logs,
//! the gateway also takes the token from a `token` query parameter, an
//! `Authorization: Bearer <jwt>` header, or an offered `Sec-WebSocket-Protocol` value that looks
//! like a JWT (browsers: `new WebSocket(url, ["pgws", jwt])`). When the token comes from one of
//! those, the path's first segment (if any) is the channel.

use axum::http::{header, HeaderMap};
use percent_encoding::percent_decode_str;

/// The subprotocol the gateway selects when a client offers it next to a token.
pub(crate) const SUBPROTOCOL: &str = "pgws";

/// What a handshake asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// The requested channel, percent-decoded.
    pub(crate) channel: Option<String>,
    /// The token, if any was found.
    pub(crate) token: Option<String>,
    /// The `Sec-WebSocket-Protocol` value to answer with, when the token came from there.
    pub(crate) protocol: Option<String>,
}

/// Finds the token and the channel of a request.
pub(crate) fn credentials(path: &str, query: Option<&str>, headers: &HeaderMap) -> Credentials {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    if segments.len() == 2 {
        return Credentials {
            channel: segments.first().cloned(),
            token: segments.get(1).cloned(),
            protocol: None,
        };
    }
    let first = segments.into_iter().next();
    let (token, protocol) = match query_token(query)
        .or_else(|| bearer_token(headers))
        .map(|t| (t, None))
        .or_else(|| protocol_token(headers))
    {
        Some((token, protocol)) => (Some(token), protocol),
        None => {
            // postgres-websockets: a single segment is the token.
            return Credentials {
                channel: None,
                token: first,
                protocol: None,
            };
        }
    };
    Credentials {
        channel: first,
        token,
        protocol,
    }
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token" && !v.is_empty())
            .then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

/// A JWT among the offered subprotocols; answers with `pgws` when offered, else the token
/// itself (a browser fails a handshake whose answer is not one of its offers).
fn protocol_token(headers: &HeaderMap) -> Option<(String, Option<String>)> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let token = offered.iter().find(|p| looks_like_jwt(p))?;
    let answer = if offered.contains(&SUBPROTOCOL) {
        SUBPROTOCOL
    } else {
        token
    };
    Some(((*token).to_owned(), Some(answer.to_owned())))
}

fn looks_like_jwt(s: &str) -> bool {
    s.split('.').count() == 3
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const JWT: &str = "aaa.bbb.ccc";

    fn creds(
        path: &str,
        query: Option<&str>,
        headers: &[(header::HeaderName, &str)],
    ) -> Credentials {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(k.clone(), HeaderValue::from_str(v).expect("header"));
        }
        credentials(path, query, &map)
    }

    #[test]
    fn reference_paths() {
        let c = creds("/chat/aaa.bbb.ccc", None, &[]);
        assert_eq!(
            (c.channel.as_deref(), c.token.as_deref()),
            (Some("chat"), Some(JWT))
        );
        let c = creds("/aaa.bbb.ccc", None, &[]);
        assert_eq!((c.channel, c.token.as_deref()), (None, Some(JWT)));
        let c = creds("/chat/aaa.bbb.ccc/ignored/too", None, &[]);
        assert_eq!(c.channel.as_deref(), Some("chat"));
        let c = creds("/my%20room/aaa.bbb.ccc", None, &[]);
        assert_eq!(c.channel.as_deref(), Some("my room"));
        assert_eq!(creds("/", None, &[]).token, None);
    }

    #[test]
    fn query_parameter() {
        let c = creds("/chat", Some("x=1&token=aaa.bbb.ccc"), &[]);
        assert_eq!(
            (c.channel.as_deref(), c.token.as_deref()),
            (Some("chat"), Some(JWT))
        );
        let c = creds("/", Some("token=aaa.bbb.ccc"), &[]);
        assert_eq!((c.channel, c.token.as_deref()), (None, Some(JWT)));
    }

    #[test]
    fn bearer_header() {
        let c = creds(
            "/chat",
            None,
            &[(header::AUTHORIZATION, "Bearer aaa.bbb.ccc")],
        );
        assert_eq!(
            (c.channel.as_deref(), c.token.as_deref()),
            (Some("chat"), Some(JWT))
        );
        assert_eq!(c.protocol, None);
    }

    #[test]
    fn subprotocol_header() {
        let c = creds(
            "/chat",
            None,
            &[(header::SEC_WEBSOCKET_PROTOCOL, "pgws, aaa.bbb.ccc")],
        );
        assert_eq!(c.token.as_deref(), Some(JWT));
        assert_eq!(c.protocol.as_deref(), Some("pgws"));
        let c = creds(
            "/",
            None,
            &[(header::SEC_WEBSOCKET_PROTOCOL, "aaa.bbb.ccc")],
        );
        assert_eq!(c.protocol.as_deref(), Some(JWT));
        let c = creds(
            "/x",
            None,
            &[(header::SEC_WEBSOCKET_PROTOCOL, "chat, superchat")],
        );
        assert_eq!((c.channel, c.token.as_deref()), (None, Some("x")));
    }
}
