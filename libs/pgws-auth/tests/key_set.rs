//! Key rotation through a [`KeySet`]: an `Authorizer` built on it verifies with whatever set
//! was installed last and good, with really signed tokens.

use std::sync::Arc;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgws_auth::{Authorizer, KeySet, Rejection};
use serde_json::json;

const NOW: u64 = 1_700_000_000;
const RSA_PRIVATE: &str = include_str!("keys/rsa_private.pem");
const RSA2_PRIVATE: &str = include_str!("keys/rsa2_private.pem");
const RSA_JWK: &str = include_str!("keys/rsa_public.jwk.json");
const RSA2_JWK: &str = include_str!("keys/rsa2_public.jwk.json");
const JWKS: &str = include_str!("keys/jwks.json");
/// The bytes of the `k` of the `hmac-1` key of `jwks.json`.
const OCT_SECRET: &[u8] = b"a-jwk-oct-secret-that-is-32bytes!";

fn rs256(pem: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa key");
    encode(&header, &json!({"mode": "rw", "channel": "chat"}), &key).expect("signs")
}

fn jwks(keys: &[&str]) -> Vec<u8> {
    format!("{{\"keys\": [{}]}}", keys.join(",")).into_bytes()
}

fn verdict(auth: &Authorizer, token: &str) -> Result<(), Rejection> {
    auth.authorize(token, None, NOW).map(|_| ())
}

#[test]
fn tokens_follow_the_installed_set() {
    let set = Arc::new(KeySet::new());
    let auth = Authorizer::from_key_set(Arc::clone(&set));
    let a = rs256(RSA_PRIVATE, Some("rsa-1"));
    let b = rs256(RSA2_PRIVATE, Some("rsa-2"));
    let unknown = Err(Rejection::Invalid("unknown key id".to_owned()));

    // Before any document: nothing is accepted, and every kid is unknown.
    assert_eq!(verdict(&auth, &a), unknown);
    assert_eq!(auth.unknown_kid(&a).as_deref(), Some("rsa-1"));

    set.install(&jwks(&[RSA_JWK])).expect("good document");
    assert_eq!(verdict(&auth, &a), Ok(()));
    assert_eq!(auth.unknown_kid(&a), None);
    assert_eq!(auth.unknown_kid(&b).as_deref(), Some("rsa-2"));
    assert_eq!(verdict(&auth, &b), unknown);

    // Rotation: B is published and A withdrawn.
    set.install(&jwks(&[RSA2_JWK])).expect("good document");
    assert_eq!(verdict(&auth, &b), Ok(()));
    assert_eq!(verdict(&auth, &a), unknown);
    assert_eq!(auth.unknown_kid(&a).as_deref(), Some("rsa-1"));

    // A garbled document changes nothing.
    assert!(set.install(b"<html>500</html>").is_err());
    assert!(set.install(b"{\"keys\": []}").is_err());
    assert_eq!(verdict(&auth, &b), Ok(()));

    // Clones of the authorizer share the set.
    let clone = auth.clone();
    set.install(&jwks(&[RSA_JWK, RSA2_JWK]))
        .expect("good document");
    assert_eq!(verdict(&clone, &a), Ok(()));
    assert_eq!(verdict(&clone, &b), Ok(()));
}

#[test]
fn only_fetched_sets_have_unknown_kids() {
    let configured = Authorizer::from_secret(JWKS, false).expect("jwks secret");
    assert_eq!(
        configured.unknown_kid(&rs256(RSA_PRIVATE, Some("nope"))),
        None
    );

    let set = Arc::new(KeySet::new());
    set.install(JWKS.as_bytes()).expect("good document");
    let auth = Authorizer::from_key_set(set);
    // No kid: every key of the family is tried, nothing to refresh.
    let no_kid = rs256(RSA_PRIVATE, None);
    assert_eq!(auth.unknown_kid(&no_kid), None);
    assert_eq!(verdict(&auth, &no_kid), Ok(()));
    assert_eq!(auth.unknown_kid("not-a-token"), None);
    assert_eq!(auth.unknown_kid(&rs256(RSA_PRIVATE, Some("ec-1"))), None);
}

#[test]
fn symmetric_keys_are_never_taken_from_a_url() {
    let set = Arc::new(KeySet::new());
    // jwks.json also holds the oct key hmac-1, which a configured secret accepts.
    assert_eq!(set.install(JWKS.as_bytes()).expect("good document"), 4);
    let auth = Authorizer::from_key_set(set);
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hmac-1".to_owned());
    let hs = encode(
        &header,
        &json!({"mode": "rw", "channel": "chat"}),
        &EncodingKey::from_secret(OCT_SECRET),
    )
    .expect("signs");
    assert_eq!(auth.unknown_kid(&hs).as_deref(), Some("hmac-1"));
    assert!(verdict(&auth, &hs).is_err());
    let configured = Authorizer::from_secret(JWKS, false).expect("jwks secret");
    assert_eq!(verdict(&configured, &hs), Ok(()));
}
