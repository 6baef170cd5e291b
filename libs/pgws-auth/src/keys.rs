//! Turns the configured `PGWS_JWT_SECRET` into the set of keys tokens are verified with.
//!
//! The secret is tried, in order, as a JWKS document (`{"keys": [...]}`), a single JWK (an
//! object with `kty`), and otherwise as a raw HMAC secret (its UTF-8 bytes, or base64 when
//! `PGWS_JWT_SECRET_BASE64` is set). Every key is tied to the algorithms of its own family
//! (narrowed by curve and by the JWK's `alg` member) so a token can never pick an algorithm
//! from another family than its key: that is what stops algorithm-confusion attacks.
//! Problems are reported once, at start-up, as [`SecretError`]. A JWKS document fetched from a
//! URL goes through the same key parsing, with bounds and without symmetric keys
//! ([`parse_fetched_jwks`]).

use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::{Map, Value};

/// Why the configured secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret (or what its base64 decodes to) has no bytes.
    #[error("jwt secret is empty")]
    Empty,
    /// `PGWS_JWT_SECRET_BASE64` is set but the secret does not decode.
    #[error("jwt secret is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The secret is a single JWK that cannot be used to verify signatures.
    #[error("jwk: {0}")]
    Jwk(String),
    /// The secret is a JWKS document that is malformed or has no usable signing key.
    #[error("jwks: {0}")]
    Jwks(String),
}

/// One verification key and the only algorithms it may be used with.
#[derive(Clone, Debug)]
pub(crate) struct VerifyingKey {
    /// The JWK `kid`, if any.
    pub(crate) kid: Option<String>,
    /// Non-empty, and all of one family: the family of `key`.
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) key: DecodingKey,
}

/// All keys of the configured secret.
#[derive(Clone, Debug)]
pub(crate) struct KeyRing {
    /// Non-empty.
    pub(crate) keys: Vec<VerifyingKey>,
    /// True for a JWKS document: only then does a token's `kid` select the key.
    pub(crate) is_set: bool,
}

/// Why one JWK cannot be used.
enum JwkProblem {
    /// A key this service does not verify with (encryption key, unknown curve...): skipped in
    /// a JWKS, an error on its own.
    Unsupported(String),
    /// A broken key: always an error.
    Invalid(String),
}

impl JwkProblem {
    fn message(self) -> String {
        match self {
            JwkProblem::Unsupported(m) | JwkProblem::Invalid(m) => m,
        }
    }
}

/// Accepts base64 in the standard and the url-safe alphabets, padded or not.
fn decode_lenient_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let standard: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            other => other,
        })
        .collect();
    ENGINE.decode(standard)
}

/// The bytes of a raw HMAC secret: its UTF-8, or (`base64`) what it decodes to in either
/// alphabet, padded or not; never empty.
pub fn hmac_secret(secret: &str, base64: bool) -> Result<Vec<u8>, SecretError> {
    let bytes = if base64 {
        decode_lenient_base64(secret.trim())?
    } else {
        secret.as_bytes().to_vec()
    };
    if bytes.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(bytes)
}

/// Parses the resolved `PGWS_JWT_SECRET`; `base64` applies to a raw HMAC secret only.
pub(crate) fn parse_secret(secret: &str, base64: bool) -> Result<KeyRing, SecretError> {
    if secret.is_empty() {
        return Err(SecretError::Empty);
    }
    if let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(secret) {
        if let Some(Value::Array(keys)) = doc.get("keys") {
            return parse_jwks(keys, Origin::Configured);
        }
        if doc.contains_key("kty") {
            let key = parse_jwk(&doc).map_err(|p| SecretError::Jwk(p.message()))?;
            return Ok(KeyRing {
                keys: vec![key],
                is_set: false,
            });
        }
    }
    let bytes = hmac_secret(secret, base64)?;
    let key = VerifyingKey {
        kid: None,
        algorithms: AlgorithmFamily::Hmac.algorithms().to_vec(),
        key: DecodingKey::from_secret(&bytes),
    };
    Ok(KeyRing {
        keys: vec![key],
        is_set: false,
    })
}

/// Which keys of a JWKS document are taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The operator's own `PGWS_JWT_SECRET`: every signing key, HMAC included.
    Configured,
    /// A document fetched from a URL (`jwks::KeySet`): public keys only, since a symmetric key
    /// anyone could read would let anyone sign.
    Fetched,
}

/// Parses a JWKS document fetched from a URL: a JSON object whose `keys` array holds at most
/// `max_keys` entries; `oct` (HMAC) keys are skipped.
pub(crate) fn parse_fetched_jwks(document: &[u8], max_keys: usize) -> Result<KeyRing, SecretError> {
    let doc: Value = serde_json::from_slice(document)
        .map_err(|e| SecretError::Jwks(format!("not JSON: {e}")))?;
    let Some(Value::Array(entries)) = doc.get("keys") else {
        return Err(SecretError::Jwks(
            "not a JSON object with a \"keys\" array".to_owned(),
        ));
    };
    if entries.len() > max_keys {
        return Err(SecretError::Jwks(format!(
            "{} keys, more than {max_keys}",
            entries.len()
        )));
    }
    parse_jwks(entries, Origin::Fetched)
}

fn parse_jwks(entries: &[Value], origin: Origin) -> Result<KeyRing, SecretError> {
    let mut keys = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(jwk) = entry else {
            return Err(SecretError::Jwks(format!(
                "key {index} is not a JSON object"
            )));
        };
        match parse_jwk(jwk) {
            Ok(key) if origin == Origin::Fetched && key.key.family() == AlgorithmFamily::Hmac => {}
            Ok(key) => keys.push(key),
            Err(JwkProblem::Unsupported(_)) => {}
            Err(JwkProblem::Invalid(m)) => {
                return Err(SecretError::Jwks(format!("key {index}: {m}")));
            }
        }
    }
    if keys.is_empty() {
        return Err(SecretError::Jwks("no usable signing key".to_owned()));
    }
    Ok(KeyRing { keys, is_set: true })
}

fn optional_str<'a>(
    jwk: &'a Map<String, Value>,
    member: &str,
) -> Result<Option<&'a str>, JwkProblem> {
    match jwk.get(member) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JwkProblem::Invalid(format!("\"{member}\" is not a string"))),
    }
}

/// A base64url member (RFC 7518 says unpadded; padding is tolerated), non-empty.
fn b64_member(jwk: &Map<String, Value>, member: &str) -> Result<Vec<u8>, JwkProblem> {
    let text = optional_str(jwk, member)?
        .ok_or_else(|| JwkProblem::Invalid(format!("missing \"{member}\"")))?;
    let bytes = decode_lenient_base64(text)
        .map_err(|e| JwkProblem::Invalid(format!("\"{member}\" is not base64url: {e}")))?;
    if bytes.is_empty() {
        return Err(JwkProblem::Invalid(format!("\"{member}\" is empty")));
    }
    Ok(bytes)
}

/// A curve coordinate or public key of exactly `len` bytes.
fn sized_member(jwk: &Map<String, Value>, member: &str, len: usize) -> Result<Vec<u8>, JwkProblem> {
    let bytes = b64_member(jwk, member)?;
    if bytes.len() != len {
        return Err(JwkProblem::Invalid(format!(
            "\"{member}\" is {} bytes, expected {len}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Checks that a public key is usable by trying it once on a dummy signature: a malformed
/// curve point is refused when the verifier is built, a wrong signature only returns false.
fn check_usable(key: &DecodingKey, alg: Algorithm) -> Result<(), JwkProblem> {
    jsonwebtoken::crypto::verify("AA", b"probe", key, alg)
        .map(|_| ())
        .map_err(|e| JwkProblem::Invalid(format!("not a valid public key: {e}")))
}

fn parse_jwk(jwk: &Map<String, Value>) -> Result<VerifyingKey, JwkProblem> {
    let kty = optional_str(jwk, "kty")?
        .ok_or_else(|| JwkProblem::Invalid("missing \"kty\"".to_owned()))?;
    if optional_str(jwk, "use")? == Some("enc") {
        return Err(JwkProblem::Unsupported(
            "key is for encryption (\"use\": \"enc\")".to_owned(),
        ));
    }
    let declared = match optional_str(jwk, "alg")? {
        None => None,
        Some(name) => Some(
            Algorithm::from_str(name)
                .map_err(|_| JwkProblem::Unsupported(format!("unsupported \"alg\": {name}")))?,
        ),
    };
    let kid = optional_str(jwk, "kid")?.map(str::to_owned);

    let (key, family_algs): (DecodingKey, &[Algorithm]) = match kty {
        "oct" => (
            DecodingKey::from_secret(&b64_member(jwk, "k")?),
            AlgorithmFamily::Hmac.algorithms(),
        ),
        "RSA" => {
            let n = b64_member(jwk, "n")?;
            let e = b64_member(jwk, "e")?;
            (
                DecodingKey::from_rsa_raw_components(&n, &e),
                AlgorithmFamily::Rsa.algorithms(),
            )
        }
        "EC" => {
            let (alg, size) = match optional_str(jwk, "crv")? {
                Some("P-256") => (Algorithm::ES256, 32),
                Some("P-384") => (Algorithm::ES384, 48),
                Some(other) => {
                    return Err(JwkProblem::Unsupported(format!(
                        "unsupported EC curve {other}"
                    )))
                }
                None => return Err(JwkProblem::Invalid("missing \"crv\"".to_owned())),
            };
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend(sized_member(jwk, "x", size)?);
            point.extend(sized_member(jwk, "y", size)?);
            let key = DecodingKey::from_ec_der(&point);
            check_usable(&key, alg)?;
            let algs: &[Algorithm] = if alg == Algorithm::ES256 {
                &[Algorithm::ES256]
            } else {
                &[Algorithm::ES384]
            };
            (key, algs)
        }
        "OKP" => {
            match optional_str(jwk, "crv")? {
                Some("Ed25519") => {}
                Some(other) => {
                    return Err(JwkProblem::Unsupported(format!(
                        "unsupported OKP curve {other}"
                    )))
                }
                None => return Err(JwkProblem::Invalid("missing \"crv\"".to_owned())),
            }
            let key = DecodingKey::from_ed_der(&sized_member(jwk, "x", 32)?);
            check_usable(&key, Algorithm::EdDSA)?;
            (key, AlgorithmFamily::Ed.algorithms())
        }
        other => {
            return Err(JwkProblem::Unsupported(format!(
                "unsupported key type {other}"
            )))
        }
    };

    let algorithms = match declared {
        None => family_algs.to_vec(),
        Some(alg) if family_algs.contains(&alg) => vec![alg],
        Some(alg) => {
            return Err(JwkProblem::Invalid(format!(
                "\"alg\" {alg:?} does not fit this {kty} key"
            )));
        }
    };
    Ok(VerifyingKey {
        kid,
        algorithms,
        key,
    })
}

#[cfg(test)]
mod tests;
