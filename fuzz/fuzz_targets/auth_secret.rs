//! Parsing `PGWS_JWT_SECRET` (`pgws_auth::Authorizer::from_secret`: an HMAC secret, base64
//! or not, a JWK or a JWKS document) and the documents a `PGWS_JWKS_URL` serves
//! (`pgws_auth::KeySet::install`). Any text is refused with an error or accepted; the keys of
//! an accepted one then verify tokens of every algorithm without panicking; a refused JWKS
//! document leaves the keys installed before it in place, and an accepted one never lets a
//! token signed with one of its shared (`oct`) secrets through.
//!
//! Input: one byte of flags (bit 0: `PGWS_JWT_SECRET_BASE64`; bits 1-2: the signature's
//! length; bit 3: a JWKS URL's document instead of the secret), then the text, so that a JWK
//! or JWKS file with a byte in front is a seed.

#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgws_auth::{Authorizer, KeySet, MAX_JWKS_KEYS};
use pgws_fuzz::NOW;

/// The document a JWKS URL served before the fuzzed one.
const JWKS: &str = include_str!("../../libs/pgws-auth/tests/keys/jwks.json");

const ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// A document anyone may fetch never makes a shared secret a verification key: a token
/// signed with the `k` of any of its `oct` keys is refused.
fn no_shared_secret(authorizer: &Authorizer, document: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(document) else {
        return;
    };
    let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
        return;
    };
    for jwk in keys {
        let k = jwk.get("k").and_then(|k| k.as_str()).unwrap_or_default();
        let Ok(secret) = URL_SAFE_NO_PAD.decode(k.trim_end_matches('=')) else {
            continue;
        };
        if secret.is_empty() {
            continue;
        }
        let mut header = Header::new(Algorithm::HS256);
        header.kid = jwk.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        let claims = serde_json::json!({"mode": "rw", "channel": "chat"});
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret))
            .expect("signs");
        assert!(
            authorizer.authorize(&token, None, NOW).is_err(),
            "a JWKS URL's oct key verified a token"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((flags, secret)) = data.split_first() else {
        return;
    };
    let authorizer = if flags & 8 == 0 {
        let secret = String::from_utf8_lossy(secret);
        let Ok(authorizer) = Authorizer::from_secret(&secret, flags & 1 == 1) else {
            return;
        };
        authorizer
    } else {
        let set = Arc::new(KeySet::new());
        let before = set.install(JWKS.as_bytes()).expect("the test keys install");
        let installed = set.install(secret);
        match installed {
            Ok(n) => assert!(
                n == set.len() && (1..=MAX_JWKS_KEYS).contains(&n),
                "{n} keys"
            ),
            Err(_) => {
                // The test keys minus the HMAC one (a fetched set takes public keys only).
                assert_eq!(set.len(), before, "a refused document changed the keys");
                assert!(set.contains_kid("rsa-1"));
            }
        }
        let authorizer = Authorizer::from_key_set(set);
        if installed.is_ok() {
            no_shared_secret(&authorizer, secret);
        }
        authorizer
    };
    let claims = URL_SAFE_NO_PAD.encode(br#"{"mode":"rw","channel":"chat"}"#);
    let length = [0, 64, 96, 256][usize::from(flags >> 1 & 3)];
    let signature = URL_SAFE_NO_PAD.encode(vec![0x5a; length]);
    for alg in ALGORITHMS {
        for kid in [None, Some("hmac-1"), Some("rsa-1")] {
            let header = serde_json::json!({"alg": alg, "kid": kid});
            let header = URL_SAFE_NO_PAD.encode(header.to_string());
            let token = format!("{header}.{claims}.{signature}");
            let _ = authorizer.authorize(&token, None, NOW);
        }
    }
});
