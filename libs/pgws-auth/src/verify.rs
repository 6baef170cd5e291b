//! Signature verification of a compact JWT against the configured keys.
//!
//! jsonwebtoken does the cryptography; this module decides which key(s) and which single
//! algorithm a token may be checked with before any cryptography runs: `none` and unknown
//! algorithms are refused, a JWKS `kid` selects its key, and a key is only ever used with an
//! algorithm of its own family (no algorithm confusion). Library errors become the short,
//! human descriptions of [`Rejection::Invalid`]. Time claims are left to `claims`, which
//! checks them against the injected clock.

use std::collections::HashSet;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::keys::{KeyRing, VerifyingKey};
use crate::Rejection;

fn invalid(description: &str) -> Rejection {
    Rejection::Invalid(description.to_owned())
}

/// The protected header members that decide how the token is verified.
struct HeaderInfo {
    alg: Algorithm,
    kid: Option<String>,
}

fn read_header(token: &str) -> Result<HeaderInfo, Rejection> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed token"));
    };
    let header: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| invalid("malformed token"))?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            Algorithm::from_str(name).map_err(|_| invalid("algorithm not allowed"))?
        }
        _ => return Err(invalid("malformed token")),
    };
    // RFC 7515 §4.1.11: extensions marked critical must be understood; we understand none.
    if header.contains_key("crit") {
        return Err(invalid("unsupported critical header"));
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(invalid("malformed token")),
    };
    Ok(HeaderInfo { alg, kid })
}

/// The `kid` of a well-formed token's header, if it names one.
pub(crate) fn header_kid(token: &str) -> Option<String> {
    read_header(token).ok()?.kid
}

/// Short human description of a jsonwebtoken failure.
fn describe(error: &jsonwebtoken::errors::Error) -> Rejection {
    match error.kind() {
        ErrorKind::ExpiredSignature => Rejection::Expired,
        ErrorKind::InvalidSignature | ErrorKind::Signing(_) => invalid("invalid signature"),
        ErrorKind::ImmatureSignature => invalid("token not yet valid (nbf)"),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => invalid("algorithm not allowed"),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => invalid("malformed token"),
        ErrorKind::InvalidClaimFormat(claim) | ErrorKind::MissingRequiredClaim(claim) => {
            Rejection::Invalid(format!("invalid {claim} claim"))
        }
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat => invalid("key cannot verify this token"),
        _ => invalid("invalid token"),
    }
}

fn validation_for(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    // exp/nbf are optional and checked against the injected clock by `claims::check_times`.
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation
}

/// The keys a token may be verified with, in configuration order.
fn candidates<'a>(
    ring: &'a KeyRing,
    header: &HeaderInfo,
) -> Result<Vec<&'a VerifyingKey>, Rejection> {
    let selected: Vec<&VerifyingKey> = match (&header.kid, ring.is_set) {
        (Some(kid), true) => {
            let by_kid: Vec<_> = ring
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect();
            if by_kid.is_empty() {
                return Err(invalid("unknown key id"));
            }
            by_kid
        }
        _ => ring.keys.iter().collect(),
    };
    let usable: Vec<_> = selected
        .into_iter()
        .filter(|k| k.algorithms.contains(&header.alg))
        .collect();
    if usable.is_empty() {
        return Err(invalid("algorithm not allowed"));
    }
    Ok(usable)
}

/// Verifies the token's signature and returns all its claims, exactly as sent.
pub(crate) fn verify(ring: &KeyRing, token: &str) -> Result<Map<String, Value>, Rejection> {
    let header = read_header(token)?;
    let validation = validation_for(header.alg);
    let mut first_error = None;
    for key in candidates(ring, &header)? {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
            Ok(data) => return Ok(data.claims),
            // A malformed token fails the same way with every key.
            Err(e) if describe(&e) == invalid("malformed token") => return Err(describe(&e)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.map_or_else(|| invalid("invalid signature"), |e| describe(&e)))
}
