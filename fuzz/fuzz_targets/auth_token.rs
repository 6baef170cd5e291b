//! Verifying tokens (`pgws_auth::Authorizer`): any token string, or a token made of fuzzed
//! header, claims and signature, or one really signed with the configured HMAC key, against
//! an HMAC secret, a JWK and a JWKS document. Nothing panics; an accepted token grants a mode
//! its claims hold and at least one channel (the requested one alone when there is one) and
//! has not expired; a token signed with the key is never refused for its signature.

#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use pgws_auth::{parse_mode, Authorizer, Policy, Rejection};
use pgws_fuzz::{NOW, SECRET};
use serde_json::{Map, Value};

const JWK: &str = include_str!("../../libs/pgws-auth/tests/keys/oct.jwk.json");
const JWKS: &str = include_str!("../../libs/pgws-auth/tests/keys/jwks.json");
/// The bytes of the `k` of the JWK (the `hmac-1` key of the JWKS).
const JWK_SECRET: &[u8] = b"a-jwk-oct-secret-that-is-32bytes!";

#[derive(Debug)]
enum Token {
    /// Any text.
    Raw(String),
    /// Fuzzed parts, base64url-encoded.
    Parts {
        header: Vec<u8>,
        claims: Vec<u8>,
        signature: Vec<u8>,
    },
    /// Claims signed with the key of the chosen authorizer.
    Signed {
        alg: Algorithm,
        kid: Option<String>,
        claims: Map<String, Value>,
    },
}

#[derive(Debug)]
struct Input {
    /// 0: HMAC secret, 1: JWK, 2: JWKS.
    keys: usize,
    token: Token,
    requested: Option<String>,
    policy: Policy,
    now: u64,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let token = match u.int_in_range(0..=3)? {
            0 => Token::Raw(u.arbitrary()?),
            1 => Token::Parts {
                header: u.arbitrary()?,
                claims: u.arbitrary()?,
                signature: u.arbitrary()?,
            },
            _ => Token::Signed {
                alg: *u.choose(&[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512])?,
                kid: if u.arbitrary()? {
                    Some("hmac-1".to_owned())
                } else {
                    u.arbitrary()?
                },
                claims: pgws_fuzz::claims(u)?,
            },
        };
        let requested = if u.arbitrary()? {
            Some(pgws_fuzz::channel(u)?)
        } else {
            None
        };
        let policy = Policy {
            leeway: u64::from(u.arbitrary::<u16>()?),
            audience: u.arbitrary()?,
            issuer: u.arbitrary()?,
        };
        Ok(Input {
            keys: u.int_in_range(0..=2)?,
            token,
            requested,
            policy,
            now: NOW.wrapping_add_signed(i64::from(u.arbitrary::<i16>()?)),
        })
    }
}

fn authorizers() -> &'static [Authorizer; 3] {
    static KEYS: OnceLock<[Authorizer; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [SECRET, JWK, JWKS].map(|secret| Authorizer::from_secret(secret, false).expect("valid"))
    })
}

fuzz_target!(|input: Input| {
    let authorizer = authorizers()[input.keys].clone().with_policy(input.policy);
    let (token, signed) = match &input.token {
        Token::Raw(text) => (text.clone(), false),
        Token::Parts {
            header,
            claims,
            signature,
        } => {
            let [h, c, s] = [header, claims, signature].map(|p| URL_SAFE_NO_PAD.encode(p));
            (format!("{h}.{c}.{s}"), false)
        }
        Token::Signed { alg, kid, claims } => {
            let secret = if input.keys == 0 {
                SECRET.as_bytes()
            } else {
                JWK_SECRET
            };
            let mut header = Header::new(*alg);
            header.kid = kid.clone();
            let token = jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
                .expect("signs");
            // In a JWKS, only a token naming the key's id is checked with it.
            (token, input.keys != 2 || kid.as_deref() == Some("hmac-1"))
        }
    };
    let requested = input.requested.as_deref();
    let result = authorizer.authorize(&token, requested, input.now);
    match &result {
        Ok(grant) => {
            assert!(!grant.channels.is_empty());
            if let Some(requested) = requested {
                assert_eq!(grant.channels, [requested]);
            }
            assert_eq!(parse_mode(&grant.claims), Ok(grant.mode));
            if let Some(expires_at) = grant.expires_at {
                assert!(expires_at > input.now, "{expires_at} <= {}", input.now);
            }
        }
        Err(Rejection::Invalid(why)) if signed => {
            assert_ne!(
                why, "invalid signature",
                "a token signed with the key: {token}"
            );
        }
        Err(_) => {}
    }
    let verified = authorizer.verify(&token, input.now);
    let again = verified.and_then(|v| v.grant(requested));
    assert_eq!(
        again.map(|g| (g.mode, g.channels, g.expires_at)),
        result.map(|g| (g.mode, g.channels, g.expires_at))
    );
});
