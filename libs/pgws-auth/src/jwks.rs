//! Key sets that come from a JWKS URL (`PGWS_JWKS_URL`) and change while the service runs.
//!
//! A [`KeySet`] holds the last good set of keys. [`KeySet::install`] parses a fetched document
//! with bounds (size, number of keys, public keys only) and swaps the set in one step only
//! when the whole document is good: a failing or garbled endpoint never leaves the service
//! with fewer keys than it had. Fetching and scheduling are the service's business; this
//! module does no I/O.

use std::sync::{Arc, PoisonError, RwLock};

use crate::keys::{self, KeyRing};
use crate::SecretError;

/// The largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// The most entries a JWKS document may list.
pub const MAX_JWKS_KEYS: usize = 100;

/// The current keys of a JWKS URL, shared by the verifier and whatever refreshes them.
#[derive(Debug, Default)]
pub struct KeySet {
    /// `None` until the first good document.
    current: RwLock<Option<Arc<KeyRing>>>,
}

impl KeySet {
    /// An empty set: every token is refused until a document is installed.
    pub fn new() -> KeySet {
        KeySet::default()
    }

    /// Parses `document` and, when it is a good JWKS, makes its keys the current ones and
    /// returns how many there are. A bad document changes nothing.
    pub fn install(&self, document: &[u8]) -> Result<usize, SecretError> {
        if document.len() > MAX_JWKS_BYTES {
            return Err(SecretError::Jwks(format!(
                "document of {} bytes, more than {MAX_JWKS_BYTES}",
                document.len()
            )));
        }
        let ring = Arc::new(keys::parse_fetched_jwks(document, MAX_JWKS_KEYS)?);
        let count = ring.keys.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(ring);
        Ok(count)
    }

    /// The keys tokens are verified with now; `None` before the first good document.
    pub(crate) fn ring(&self) -> Option<Arc<KeyRing>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Keys in the current set (0 before the first good document).
    pub fn len(&self) -> usize {
        self.ring().map_or(0, |r| r.keys.len())
    }

    /// True before the first good document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the current set has a key with this `kid`.
    pub fn contains_kid(&self, kid: &str) -> bool {
        self.ring()
            .is_some_and(|r| r.keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWKS: &str = include_str!("../tests/keys/jwks.json");
    const RSA_JWK: &str = include_str!("../tests/keys/rsa_public.jwk.json");

    fn doc(keys: &[&str]) -> Vec<u8> {
        format!("{{\"keys\": [{}]}}", keys.join(",")).into_bytes()
    }

    #[test]
    fn a_good_document_replaces_the_set() {
        let set = KeySet::new();
        assert!(set.is_empty() && set.ring().is_none());
        // jwks.json: hmac-1 (skipped: symmetric), rsa-1, rsa-2, ec-1, ed-1.
        assert_eq!(set.install(JWKS.as_bytes()).expect("good"), 4);
        assert!(set.contains_kid("rsa-2") && !set.contains_kid("hmac-1"));
        assert_eq!(set.install(&doc(&[RSA_JWK])).expect("good"), 1);
        assert!(set.contains_kid("rsa-1") && !set.contains_kid("rsa-2"));
    }

    #[test]
    fn a_bad_document_keeps_the_last_good_set() {
        let set = KeySet::new();
        set.install(JWKS.as_bytes()).expect("good");
        let before = set.ring().expect("keys");
        let oct = r#"{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}"#;
        let too_many = doc(&vec![RSA_JWK; MAX_JWKS_KEYS + 1]);
        let huge = format!(
            "{{\"keys\": [{RSA_JWK}], \"pad\": \"{}\"}}",
            "x".repeat(MAX_JWKS_BYTES)
        );
        let cases: [(&[u8], &str); 8] = [
            (b"", "jwks: not JSON"),
            (b"<html>502 Bad Gateway</html>", "jwks: not JSON"),
            (
                b"{\"keys\": 3}",
                "jwks: not a JSON object with a \"keys\" array",
            ),
            (
                RSA_JWK.as_bytes(),
                "jwks: not a JSON object with a \"keys\" array",
            ),
            (&doc(&[]), "jwks: no usable signing key"),
            (&doc(&[oct]), "jwks: no usable signing key"),
            (&too_many, "jwks: 101 keys, more than 100"),
            (huge.as_bytes(), "jwks: document of "),
        ];
        for (bad, expected) in cases {
            let e = set.install(bad).expect_err("bad document").to_string();
            assert!(e.starts_with(expected), "{e}");
            let now = set.ring().expect("still keys");
            assert!(Arc::ptr_eq(&before, &now), "{expected}");
        }
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn exactly_the_limits_are_accepted() {
        let set = KeySet::new();
        let full = doc(&vec![RSA_JWK; MAX_JWKS_KEYS]);
        assert_eq!(set.install(&full).expect("at the limit"), MAX_JWKS_KEYS);
        let mut padded = format!("{{\"keys\": [{RSA_JWK}], \"pad\": \"\"}}");
        let room = MAX_JWKS_BYTES - padded.len();
        padded.insert_str(padded.len() - 2, &"x".repeat(room));
        assert_eq!(padded.len(), MAX_JWKS_BYTES);
        assert_eq!(set.install(padded.as_bytes()).expect("at the limit"), 1);
    }
}
