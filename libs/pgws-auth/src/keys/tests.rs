//! Unit tests of secret parsing: which texts become which keys, and the start-up errors
//! an operator sees for secrets that cannot be used.

use super::*;

fn err(secret: &str, base64: bool) -> String {
    match parse_secret(secret, base64) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_secret_is_refused() {
    assert_eq!(err("", false), "jwt secret is empty");
    assert_eq!(err("", true), "jwt secret is empty");
    assert_eq!(err("  \n", true), "jwt secret is empty");
}

#[test]
fn raw_secret_is_hmac_only() {
    let ring = parse_secret("reallyreallyreallyreallyverysafe", false).expect("raw secret");
    assert!(!ring.is_set);
    assert_eq!(ring.keys.len(), 1);
    assert_eq!(ring.keys[0].algorithms, AlgorithmFamily::Hmac.algorithms());
    assert_eq!(ring.keys[0].key.family(), AlgorithmFamily::Hmac);
}

#[test]
fn json_that_is_not_a_key_is_a_raw_secret() {
    for secret in [
        "{\"a\":1}",
        "[1,2]",
        "\"text\"",
        "{not json",
        "{\"keys\": 3}",
    ] {
        let ring = parse_secret(secret, false).expect("raw secret");
        assert_eq!(ring.keys[0].key.family(), AlgorithmFamily::Hmac, "{secret}");
    }
}

#[test]
fn base64_accepts_both_alphabets_and_padding_styles() {
    let expected: &[u8] = &[0xfb, 0xff, 0xbf, 0x01];
    for secret in ["+/+/AQ==", "+/+/AQ", "-_-_AQ==", "-_-_AQ", " -_-_AQ\n"] {
        let bytes = decode_lenient_base64(secret.trim()).expect(secret);
        assert_eq!(bytes, expected, "{secret}");
        assert!(parse_secret(secret, true).is_ok(), "{secret}");
    }
    assert!(err("not base64!", true).starts_with("jwt secret is not valid base64: "));
}

#[test]
fn broken_jwks_are_reported() {
    assert_eq!(err("{\"keys\": []}", false), "jwks: no usable signing key");
    assert_eq!(
        err("{\"keys\": [1]}", false),
        "jwks: key 0 is not a JSON object"
    );
    assert_eq!(
        err(
            "{\"keys\": [{\"kty\": \"RSA\", \"use\": \"enc\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}",
            false
        ),
        "jwks: no usable signing key"
    );
    assert_eq!(
        err("{\"keys\": [{\"kty\": \"oct\"}]}", false),
        "jwks: key 0: missing \"k\""
    );
}

#[test]
fn broken_jwks_entries_of_unknown_kinds_are_skipped() {
    let secret = r#"{"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "alg": "RSA-OAEP"},
        {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "X25519", "x": "AA"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "good"}
    ]}"#;
    let ring = parse_secret(secret, false).expect("one usable key");
    assert!(ring.is_set);
    assert_eq!(ring.keys.len(), 1);
    assert_eq!(ring.keys[0].kid.as_deref(), Some("good"));
}

#[test]
fn broken_single_jwks_are_reported() {
    assert_eq!(
        err("{\"kty\": \"oct\", \"k\": \"\"}", false),
        "jwk: \"k\" is empty"
    );
    assert_eq!(err("{\"kty\": 1}", false), "jwk: \"kty\" is not a string");
    assert_eq!(
        err("{\"kty\": \"XYZ\"}", false),
        "jwk: unsupported key type XYZ"
    );
    assert_eq!(
        err(
            "{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"alg\": \"RS256\"}",
            false
        ),
        "jwk: \"alg\" RS256 does not fit this oct key"
    );
    assert_eq!(
        err(
            "{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"alg\": \"none\"}",
            false
        ),
        "jwk: unsupported \"alg\": none"
    );
    assert_eq!(
        err(
            "{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"x\": \"AAAA\"}",
            false
        ),
        "jwk: \"x\" is 3 bytes, expected 32"
    );
    // 32 bytes of 0x01 is not the x of a point on P-256.
    let c = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";
    let not_on_curve =
        format!("{{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"{c}\", \"y\": \"{c}\"}}");
    assert!(err(&not_on_curve, false).starts_with("jwk: not a valid public key"));
}

#[test]
fn jwk_alg_narrows_the_allowed_algorithms() {
    let ring = parse_secret(
        "{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"alg\": \"HS384\"}",
        false,
    )
    .expect("oct jwk");
    assert_eq!(ring.keys[0].algorithms, vec![Algorithm::HS384]);
}
