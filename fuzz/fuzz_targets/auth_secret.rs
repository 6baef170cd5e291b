//! Parsing `PGWS_JWT_SECRET` (`pgws_auth::Authorizer::from_secret`): an HMAC secret, base64
//! or not, a JWK or a JWKS document. Any text is refused with an error or accepted; the keys
//! of an accepted secret then verify tokens of every algorithm without panicking.
//!
//! Input: one byte of flags (bit 0: `PGWS_JWT_SECRET_BASE64`; bits 1-2: the signature's
//! length), then the secret's text, so that a JWK or JWKS file with a byte in front is a
//! seed.

#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use pgws_auth::Authorizer;
use pgws_fuzz::NOW;

const ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

fuzz_target!(|data: &[u8]| {
    let Some((flags, secret)) = data.split_first() else {
        return;
    };
    let secret = String::from_utf8_lossy(secret);
    let Ok(authorizer) = Authorizer::from_secret(&secret, flags & 1 == 1) else {
        return;
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
