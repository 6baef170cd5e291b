//! The gateway's handshake (`ws_gateway::fuzzing::handshake`): request targets for every
//! protocol (`/<channel>/<jwt>`, `/<jwt>`, `?token=`, `Authorization`,
//! `Sec-WebSocket-Protocol`, `/ws/pub/...`, `/ws/sub/...`, `/live`, and any bytes), with tokens really
//! signed with the configured key or not. Nothing panics, and what is accepted is bounded:
//! wspubsub keys, domains and topics within their limits, keys and domains without NUL
//! (they are PostgreSQL text in the bridge's key check), channels valid PostgreSQL names
//! (1 to 63 bytes, no NUL), one channel for a direct socket and only then, every subject
//! built from them literal, an answered subprotocol one the client offered, and no socket
//! whose token expired.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use jsonwebtoken::{EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use pgws_auth::Authorizer;
use pgws_fuzz::{literal_subject, NOW, SECRET};
use pgws_proto::{valid_channel, Prefix, Subjects, Topic, MAX_APIKEY, MAX_DOMAIN, MAX_TOPIC};
use ws_gateway::fuzzing::{handshake, Handshake};
use ws_gateway::DirectChannels;

const SUBPROTOCOL: &str = "Sec-WebSocket-Protocol";

/// A path segment: written as is, or percent-encoded.
fn segment(u: &mut Unstructured<'_>, text: &str) -> Result<String> {
    if u.arbitrary()? {
        return Ok(text.to_owned());
    }
    Ok(text
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect())
}

#[derive(Debug)]
struct Input {
    target: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    direct: DirectChannels,
    now: u64,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let token = match u.int_in_range(0..=3)? {
            0 => u.arbitrary::<String>()?,
            _ => {
                let claims = pgws_fuzz::claims(u)?;
                let key = EncodingKey::from_secret(SECRET.as_bytes());
                jsonwebtoken::encode(&Header::default(), &claims, &key).expect("signs")
            }
        };
        let channel = pgws_fuzz::channel(u)?;
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let target = match u.int_in_range(0..=9)? {
            // postgres-websockets: the path.
            0 => format!("/{}/{}", segment(u, &channel)?, segment(u, &token)?),
            1 => format!("/{}", segment(u, &token)?),
            // The token beside the path.
            2 => format!(
                "/{}?x=1&token={}",
                segment(u, &channel)?,
                segment(u, &token)?
            ),
            3 => {
                headers.push((b"authorization".to_vec(), format!("Bearer {token}").into()));
                format!("/{}", segment(u, &channel)?)
            }
            4 => {
                let offer = if u.arbitrary()? {
                    format!("pgws, {token}")
                } else {
                    token.clone()
                };
                headers.push((SUBPROTOCOL.into(), offer.into()));
                format!("/{}", segment(u, &channel)?)
            }
            // wspubsub.
            5 => {
                let parts: [String; 3] = [u.arbitrary()?, u.arbitrary()?, u.arbitrary()?];
                let parts = parts
                    .iter()
                    .map(|p| segment(u, p))
                    .collect::<Result<Vec<_>>>()?;
                format!("/ws/pub/{}", parts.join("/"))
            }
            6 => {
                let parts: [String; 2] = [u.arbitrary()?, u.arbitrary()?];
                let parts = parts
                    .iter()
                    .map(|p| segment(u, p))
                    .collect::<Result<Vec<_>>>()?;
                format!("/ws/sub/{}", parts.join("/"))
            }
            // Daptin's /live, the token beside the path.
            7 => {
                let path = *u.choose(&["/live", "/live/", "/live/x"])?;
                if u.arbitrary()? {
                    format!("{path}?token={}", segment(u, &token)?)
                } else {
                    headers.push((b"authorization".to_vec(), format!("Bearer {token}").into()));
                    path.to_owned()
                }
            }
            _ => u.arbitrary()?,
        };
        headers.extend(u.arbitrary::<Vec<(Vec<u8>, Vec<u8>)>>()?);
        let direct = match u.int_in_range(0..=2)? {
            0 => DirectChannels::None,
            1 => DirectChannels::All,
            _ => DirectChannels::parse(&format!("{channel},{}", u.arbitrary::<String>()?)),
        };
        Ok(Input {
            target: target.into_bytes(),
            headers,
            direct,
            now: NOW.wrapping_add_signed(i64::from(u.arbitrary::<i16>()?)),
        })
    }
}

fn authorizer() -> &'static Authorizer {
    static KEYS: std::sync::OnceLock<Authorizer> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Authorizer::from_secret(SECRET, false).expect("valid"))
}

/// What the client offered in `Sec-WebSocket-Protocol`.
fn offered(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(SUBPROTOCOL.as_bytes()))
        .filter_map(|(_, value)| std::str::from_utf8(value).ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect()
}

fuzz_target!(|input: Input| {
    let headers: Vec<(&[u8], &[u8])> = input
        .headers
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    let Some(decided) = handshake(
        &input.target,
        &headers,
        authorizer(),
        &input.direct,
        input.now,
    ) else {
        return;
    };
    let subjects = Subjects::new(Prefix::new("pgws").expect("valid prefix"));
    let topic_ok = |domain: &str, topic: &str| {
        assert!(!domain.contains('\0'), "{domain:?}");
        assert!((1..=MAX_DOMAIN).contains(&domain.len()), "{domain:?}");
        assert!((1..=MAX_TOPIC).contains(&topic.len()), "{topic:?}");
        let topic = Topic {
            domain: domain.to_owned(),
            topic: topic.to_owned(),
        };
        let subject = subjects.topic(&topic);
        assert!(literal_subject(&subject), "{subject:?}");
    };
    match decided {
        Handshake::Publish {
            apikey,
            domain,
            topic,
        } => {
            assert!(
                apikey.len() <= MAX_APIKEY && !apikey.contains('\0'),
                "{apikey:?}"
            );
            topic_ok(&domain, &topic);
        }
        Handshake::Subscribe { domain, topic } => topic_ok(&domain, &topic),
        Handshake::Live { expires_at } => {
            if let Some(expires_at) = expires_at {
                assert!(expires_at > input.now);
            }
        }
        Handshake::Channels {
            direct,
            channels,
            subprotocol,
            expires_at,
        } => {
            assert!(!channels.is_empty());
            for channel in &channels {
                assert!(valid_channel(channel), "{channel:?}");
                assert_eq!(input.direct.contains(channel), direct, "{channel:?}");
                for subject in [subjects.deliver(channel), subjects.direct(channel)] {
                    assert!(literal_subject(&subject), "{subject:?}");
                }
            }
            if direct {
                assert_eq!(channels.len(), 1);
            }
            if let Some(answer) = subprotocol {
                assert!(offered(&input.headers).contains(&answer), "{answer:?}");
            }
            if let Some(expires_at) = expires_at {
                assert!(expires_at > input.now);
            }
        }
        Handshake::Refused { status, reason } => {
            assert!((400..=599).contains(&status), "{status} {reason}");
        }
    }
});
