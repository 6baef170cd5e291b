//! End-to-end checks of `Authorizer` with really signed tokens.
//!
//! Tokens are signed here with jsonwebtoken's `encode` and the test keys under `tests/keys/`
//! (generated once with openssl; `derive_jwks.py` made their public JWKs), so every key kind
//! the secret may hold is exercised through the same path the gateway uses.

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgws_auth::{Authorizer, Grant, Mode, Rejection};
use serde_json::{json, Value};

const NOW: u64 = 1_700_000_000;
const SECRET: &str = "reallyreallyreallyreallyverysafe";

const RSA_PRIVATE: &str = include_str!("keys/rsa_private.pem");
const RSA_PUBLIC_PEM: &str = include_str!("keys/rsa_public.pem");
const RSA2_PRIVATE: &str = include_str!("keys/rsa2_private.pem");
const EC_PRIVATE: &str = include_str!("keys/ec_private.pem");
const ED_PRIVATE: &str = include_str!("keys/ed25519_private.pem");
const RSA_JWK: &str = include_str!("keys/rsa_public.jwk.json");
const EC_JWK: &str = include_str!("keys/ec_public.jwk.json");
const ED_JWK: &str = include_str!("keys/ed25519_public.jwk.json");
const OCT_JWK: &str = include_str!("keys/oct.jwk.json");
const JWKS: &str = include_str!("keys/jwks.json");
/// The bytes of the `k` of `oct.jwk.json` (and of the `hmac-1` key of `jwks.json`).
const OCT_SECRET: &[u8] = b"a-jwk-oct-secret-that-is-32bytes!";

fn sign_with(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("test token signs")
}

fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    sign_with(alg, None, &EncodingKey::from_secret(secret), claims)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa key")
}

fn rsa2_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).expect("rsa2 key")
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).expect("ec key")
}

fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).expect("ed key")
}

fn authorizer(secret: &str) -> Authorizer {
    Authorizer::from_secret(secret, false).expect("valid secret")
}

fn claims() -> Value {
    json!({"mode": "rw", "channel": "chat"})
}

fn grant(auth: &Authorizer, token: &str) -> Grant {
    auth.authorize(token, None, NOW).expect("token accepted")
}

fn reject(auth: &Authorizer, token: &str) -> String {
    match auth.authorize(token, None, NOW) {
        Ok(grant) => panic!("token accepted: {grant:?}"),
        Err(rejection) => rejection.to_string(),
    }
}

/// An unsigned `alg: none` token, built by hand.
fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// A token whose header is replaced, keeping payload and signature.
fn with_header(token: &str, header: &str) -> String {
    let rest = token
        .split_once('.')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header))
}

#[test]
fn authorizer_is_shareable_and_messages_match_the_reference() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Authorizer>();
    shareable::<Grant>();
    let messages = [
        (Rejection::Expired, "Token expired"),
        (Rejection::MissingMode, "Missing mode"),
        (Rejection::InvalidMode, "Invalid mode"),
        (Rejection::NoAllowedChannels, "No allowed channels"),
        (Rejection::Invalid("x".to_owned()), "Error: x"),
    ];
    for (rejection, text) in messages {
        assert_eq!(rejection.to_string(), text);
    }
}

#[test]
fn hmac_string_secret_all_hs_algorithms() {
    let auth = authorizer(SECRET);
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let g = grant(&auth, &hs(alg, SECRET.as_bytes(), &claims()));
        assert_eq!(g.mode, Mode::ReadWrite, "{alg:?}");
        assert_eq!(g.channels, vec!["chat".to_owned()]);
    }
}

#[test]
fn wrong_hmac_secret_is_an_invalid_signature() {
    let auth = authorizer(SECRET);
    let token = hs(Algorithm::HS256, b"another secret entirely", &claims());
    assert_eq!(reject(&auth, &token), "Error: invalid signature");
}

#[test]
fn base64_secret_standard_and_url_alphabets() {
    // These bytes encode differently in the two alphabets ('+' '/' vs '-' '_').
    let key: Vec<u8> = (0..32u8).map(|i| 0xf8 | (i % 8)).collect();
    let standard = STANDARD.encode(&key);
    let url = URL_SAFE.encode(&key);
    assert_ne!(standard, url);
    let token = hs(Algorithm::HS256, &key, &claims());
    for secret in [
        standard.clone(),
        url.clone(),
        URL_SAFE_NO_PAD.encode(&key),
        format!("{standard}\n"),
    ] {
        let auth = Authorizer::from_secret(&secret, true).expect("base64 secret");
        assert_eq!(grant(&auth, &token).mode, Mode::ReadWrite, "{secret}");
        // Without the flag the text itself is the key, so the signature does not match.
        let raw = Authorizer::from_secret(&secret, false).expect("raw secret");
        assert_eq!(reject(&raw, &token), "Error: invalid signature");
    }
}

#[test]
fn secret_errors() {
    let empty = Authorizer::from_secret("", false)
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert_eq!(empty, Err("jwt secret is empty".to_owned()));
    let bad = Authorizer::from_secret("*not base64*", true)
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert!(bad.is_err_and(|e| e.starts_with("jwt secret is not valid base64: ")));
    let jwk = Authorizer::from_secret(r#"{"kty":"RSA","n":"AQAB"}"#, false)
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert_eq!(jwk, Err("jwk: missing \"e\"".to_owned()));
}

#[test]
fn jwk_oct_is_hmac() {
    let auth = authorizer(OCT_JWK);
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        assert_eq!(
            grant(&auth, &hs(alg, OCT_SECRET, &claims())).mode,
            Mode::ReadWrite
        );
    }
    // The JWK's JSON text is not the key.
    let token = hs(Algorithm::HS256, OCT_JWK.as_bytes(), &claims());
    assert_eq!(reject(&auth, &token), "Error: invalid signature");
}

#[test]
fn rsa_jwk_rs_and_ps() {
    let auth = authorizer(RSA_JWK);
    for alg in [
        Algorithm::RS256,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
    ] {
        let g = grant(&auth, &sign_with(alg, None, &rsa_key(), &claims()));
        assert_eq!(g.channels, vec!["chat".to_owned()], "{alg:?}");
    }
    let other = sign_with(Algorithm::RS256, None, &rsa2_key(), &claims());
    assert_eq!(reject(&auth, &other), "Error: invalid signature");
}

#[test]
fn ec_jwk_es256() {
    let auth = authorizer(EC_JWK);
    assert_eq!(
        grant(
            &auth,
            &sign_with(Algorithm::ES256, None, &ec_key(), &claims())
        )
        .mode,
        Mode::ReadWrite
    );
    // A P-256 key never verifies ES384 (the curve fixes the algorithm).
    let token = sign_with(Algorithm::ES256, None, &ec_key(), &claims());
    let es384 = with_header(&token, r#"{"alg":"ES384","typ":"JWT"}"#);
    assert_eq!(reject(&auth, &es384), "Error: algorithm not allowed");
}

#[test]
fn okp_jwk_eddsa() {
    let auth = authorizer(ED_JWK);
    assert_eq!(
        grant(
            &auth,
            &sign_with(Algorithm::EdDSA, None, &ed_key(), &claims())
        )
        .mode,
        Mode::ReadWrite
    );
}

#[test]
fn jwks_selects_by_kid() {
    let auth = authorizer(JWKS);
    let ok = |alg, kid, key: &EncodingKey| {
        let token = sign_with(alg, kid, key, &claims());
        auth.authorize(&token, None, NOW).map(|g| g.mode)
    };
    assert_eq!(
        ok(Algorithm::RS256, Some("rsa-2"), &rsa2_key()),
        Ok(Mode::ReadWrite)
    );
    assert_eq!(
        ok(Algorithm::PS512, Some("rsa-1"), &rsa_key()),
        Ok(Mode::ReadWrite)
    );
    assert_eq!(
        ok(
            Algorithm::HS256,
            Some("hmac-1"),
            &EncodingKey::from_secret(OCT_SECRET)
        ),
        Ok(Mode::ReadWrite)
    );
    assert_eq!(
        ok(Algorithm::ES256, Some("ec-1"), &ec_key()),
        Ok(Mode::ReadWrite)
    );
    assert_eq!(
        ok(Algorithm::EdDSA, Some("ed-1"), &ed_key()),
        Ok(Mode::ReadWrite)
    );
    // The kid names the key: signed by rsa-2 but claiming rsa-1 fails.
    let wrong_kid = ok(Algorithm::RS256, Some("rsa-1"), &rsa2_key());
    assert_eq!(
        wrong_kid,
        Err(Rejection::Invalid("invalid signature".to_owned()))
    );
    let unknown = ok(Algorithm::RS256, Some("nope"), &rsa_key());
    assert_eq!(
        unknown,
        Err(Rejection::Invalid("unknown key id".to_owned()))
    );
    // A kid of another family is refused before any cryptography.
    let cross = ok(Algorithm::RS256, Some("ec-1"), &rsa_key());
    assert_eq!(
        cross,
        Err(Rejection::Invalid("algorithm not allowed".to_owned()))
    );
}

#[test]
fn jwks_without_kid_tries_every_key_of_the_family() {
    let auth = authorizer(JWKS);
    for (alg, key) in [
        (Algorithm::RS256, rsa_key()),
        (Algorithm::RS256, rsa2_key()),
        (Algorithm::PS256, rsa2_key()),
        (Algorithm::HS384, EncodingKey::from_secret(OCT_SECRET)),
        (Algorithm::ES256, ec_key()),
        (Algorithm::EdDSA, ed_key()),
    ] {
        assert_eq!(
            grant(&auth, &sign_with(alg, None, &key, &claims())).mode,
            Mode::ReadWrite,
            "{alg:?}"
        );
    }
    let stranger = hs(Algorithm::HS256, b"not in the set", &claims());
    assert_eq!(reject(&auth, &stranger), "Error: invalid signature");
}

#[test]
fn alg_none_is_refused() {
    for secret in [SECRET, OCT_JWK, RSA_JWK, JWKS] {
        assert_eq!(
            reject(&authorizer(secret), &unsigned(&claims())),
            "Error: algorithm not allowed"
        );
    }
    let token = hs(Algorithm::HS256, SECRET.as_bytes(), &claims());
    let stripped = with_header(&token, r#"{"alg":"none"}"#);
    assert_eq!(
        reject(&authorizer(SECRET), &stripped),
        "Error: algorithm not allowed"
    );
}

#[test]
fn algorithm_confusion_is_refused() {
    // The classic attack: HMAC "signed" with the public key PEM an RSA verifier would hold.
    let forged = hs(Algorithm::HS256, RSA_PUBLIC_PEM.as_bytes(), &claims());
    let rsa_only_jwks = format!("{{\"keys\": [{RSA_JWK}]}}");
    for secret in [RSA_JWK, rsa_only_jwks.as_str()] {
        assert_eq!(
            reject(&authorizer(secret), &forged),
            "Error: algorithm not allowed"
        );
    }
    // A JWKS that also holds an HMAC key checks HS256 against that key only.
    assert_eq!(
        reject(&authorizer(JWKS), &forged),
        "Error: invalid signature"
    );
    let forged_kid = sign_with(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes()),
        &claims(),
    );
    assert_eq!(
        reject(&authorizer(JWKS), &forged_kid),
        "Error: algorithm not allowed"
    );
    // And the other way round: an RS256 token against an HMAC secret.
    let rs = sign_with(Algorithm::RS256, None, &rsa_key(), &claims());
    assert_eq!(
        reject(&authorizer(SECRET), &rs),
        "Error: algorithm not allowed"
    );
}

#[test]
fn jwk_alg_member_pins_the_algorithm() {
    let mut jwk: Value = serde_json::from_str(RSA_JWK).expect("jwk json");
    jwk["alg"] = json!("RS256");
    let auth = authorizer(&jwk.to_string());
    assert!(auth
        .authorize(
            &sign_with(Algorithm::RS256, None, &rsa_key(), &claims()),
            None,
            NOW
        )
        .is_ok());
    let ps = sign_with(Algorithm::PS256, None, &rsa_key(), &claims());
    assert_eq!(reject(&auth, &ps), "Error: algorithm not allowed");
}

#[test]
fn expiry_and_not_before() {
    let auth = authorizer(SECRET);
    let token = |extra: Value| {
        let mut c = claims();
        if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        hs(Algorithm::HS256, SECRET.as_bytes(), &c)
    };
    assert_eq!(
        auth.authorize(&token(json!({"exp": NOW - 10})), None, NOW)
            .map(|_| ()),
        Err(Rejection::Expired)
    );
    assert_eq!(reject(&auth, &token(json!({"exp": NOW}))), "Token expired");
    assert_eq!(
        grant(&auth, &token(json!({"exp": NOW + 1}))).expires_at,
        Some(NOW + 1)
    );
    assert_eq!(grant(&auth, &token(json!({}))).expires_at, None);
    assert_eq!(
        reject(&auth, &token(json!({"nbf": NOW + 1}))),
        "Error: token not yet valid (nbf)"
    );
    assert!(auth
        .authorize(&token(json!({"nbf": NOW})), None, NOW)
        .is_ok());
    assert_eq!(
        reject(&auth, &token(json!({"exp": "never"}))),
        "Error: invalid exp claim"
    );
    // The signature is checked before the claims.
    let expired_forgery = hs(Algorithm::HS256, b"wrong", &json!({"mode": "r", "exp": 1}));
    assert_eq!(reject(&auth, &expired_forgery), "Error: invalid signature");
}

#[test]
fn mode_rules() {
    let auth = authorizer(SECRET);
    let sign = |c: Value| hs(Algorithm::HS256, SECRET.as_bytes(), &c);
    assert_eq!(
        reject(&auth, &sign(json!({"channel": "a"}))),
        "Missing mode"
    );
    assert_eq!(
        reject(&auth, &sign(json!({"channel": "a", "mode": 7}))),
        "Missing mode"
    );
    assert_eq!(
        reject(&auth, &sign(json!({"channel": "a", "mode": "x"}))),
        "Invalid mode"
    );
    assert_eq!(
        grant(&auth, &sign(json!({"channel": "a", "mode": "r"}))).mode,
        Mode::Read
    );
    assert_eq!(
        grant(&auth, &sign(json!({"channel": "a", "mode": "w"}))).mode,
        Mode::Write
    );
    // Mode is judged before channels, as in the reference.
    assert_eq!(reject(&auth, &sign(json!({}))), "Missing mode");
}

#[test]
fn channel_rules() {
    let auth = authorizer(SECRET);
    let sign = |c: Value| hs(Algorithm::HS256, SECRET.as_bytes(), &c);
    let channels = |c: Value, requested: Option<&str>| {
        auth.authorize(&sign(c), requested, NOW).map(|g| g.channels)
    };
    let list = |items: &[&str]| Ok(items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());

    let merged = json!({"mode": "r", "channel": "b", "channels": ["a", "b", 3, "c", "a"]});
    assert_eq!(channels(merged.clone(), None), list(&["b", "a", "c"]));
    assert_eq!(channels(merged.clone(), Some("c")), list(&["c"]));
    assert_eq!(
        channels(merged, Some("z")),
        Err(Rejection::NoAllowedChannels)
    );
    assert_eq!(
        channels(json!({"mode": "r"}), Some("free")),
        list(&["free"])
    );
    assert_eq!(
        channels(json!({"mode": "r"}), None),
        Err(Rejection::NoAllowedChannels)
    );
    assert_eq!(
        channels(json!({"mode": "r", "channels": []}), None),
        Err(Rejection::NoAllowedChannels)
    );
    assert_eq!(
        channels(json!({"mode": "r", "channels": ["x", "y"]}), None),
        list(&["x", "y"])
    );
    assert_eq!(
        channels(json!({"mode": "r", "channel": "only"}), Some("only")),
        list(&["only"])
    );
    assert_eq!(
        Rejection::NoAllowedChannels.to_string(),
        "No allowed channels"
    );
}

#[test]
fn claims_are_returned_intact() {
    let auth = authorizer(SECRET);
    let sent = json!({
        "mode": "rw",
        "channels": ["a", 1],
        "sub": "user-1",
        "role": "web_user",
        "nested": {"list": [1, 2.5, null, true], "s": "é"},
        "exp": NOW + 60,
    });
    let g = grant(&auth, &hs(Algorithm::HS256, SECRET.as_bytes(), &sent));
    assert_eq!(Value::Object(g.claims), sent);
    assert_eq!(g.expires_at, Some(NOW + 60));
}

#[test]
fn malformed_tokens() {
    let auth = authorizer(SECRET);
    for token in ["abc", "a.b", "a.b.c.d", "!!.e30.", "e30.e30.", "e30.e30.x"] {
        assert!(reject(&auth, token).starts_with("Error: "), "{token}");
    }
    assert_eq!(reject(&auth, "abc"), "Error: malformed token");
    let token = hs(Algorithm::HS256, SECRET.as_bytes(), &claims());
    let (head, _) = token.rsplit_once('.').unwrap_or_default();
    let (header, _) = head.split_once('.').unwrap_or_default();
    let tampered = format!(
        "{header}.{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"mode":"rw","channel":"admin"}"#),
        token.rsplit('.').next().unwrap_or_default()
    );
    assert_eq!(reject(&auth, &tampered), "Error: invalid signature");
    let not_object = hs(Algorithm::HS256, SECRET.as_bytes(), &json!([1, 2]));
    assert_eq!(reject(&auth, &not_object), "Error: malformed token");
    let crit = with_header(&token, r#"{"alg":"HS256","crit":["b64"],"b64":false}"#);
    assert_eq!(reject(&auth, &crit), "Error: unsupported critical header");
    // As in the reference, an empty token is an empty claims set.
    assert_eq!(reject(&auth, ""), "Missing mode");
}
