//! JWT authorization of websocket connections, exactly as postgres-websockets does it.
//!
//! A client opens `/<jwt>` or `/<channel>/<jwt>`; the token must be signed with the configured
//! `PGWS_JWT_SECRET` (raw HMAC secret, JWK or JWKS), or with a key of the JWKS served at
//! `PGWS_JWKS_URL`, and its claims must grant a `mode` and at least one channel.
//! [`Authorizer`] holds the keys (parsed once at start-up, or a [`KeySet`] that the service
//! refreshes) and turns a token into a [`Grant`] or a [`Rejection`] whose text is what the
//! reference server answers. Modules: `keys` parses the secret, `jwks` holds fetched key sets,
//! `verify` checks signatures, `claims` applies the rules.

mod claims;
mod jwks;
mod keys;
mod verify;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use claims::{allowed_channels, parse_mode, Mode};
pub use jwks::{KeySet, MAX_JWKS_BYTES, MAX_JWKS_KEYS};
pub use keys::{hmac_secret, SecretError};

/// Why a connection is refused; the `Display` text is the reference's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The token's `exp` is not after now.
    #[error("Token expired")]
    Expired,
    /// No `mode` claim, or not a string.
    #[error("Missing mode")]
    MissingMode,
    /// A `mode` other than `r`, `w`, `rw`.
    #[error("Invalid mode")]
    InvalidMode,
    /// The token grants no channel, or not the requested one.
    #[error("No allowed channels")]
    NoAllowedChannels,
    /// Any other token problem, with a short human description.
    #[error("Error: {0}")]
    Invalid(String),
}

/// What an accepted token lets the socket do.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Read and/or write.
    pub mode: Mode,
    /// The socket's channels after the rules of [`allowed_channels`]; never empty.
    pub channels: Vec<String>,
    /// All claims of the token as sent (they go in the message envelope).
    pub claims: Map<String, Value>,
    /// The `exp` claim as unix seconds (rounded up), if present.
    pub expires_at: Option<u64>,
}

/// Verifies tokens against the keys of the configured secret or of a JWKS URL.
#[derive(Debug, Clone)]
pub struct Authorizer {
    keys: Keys,
    policy: Policy,
}

/// Where the verification keys come from.
#[derive(Debug, Clone)]
enum Keys {
    /// `PGWS_JWT_SECRET`, parsed once.
    Configured(Arc<keys::KeyRing>),
    /// A JWKS URL's current keys, swapped by whoever refreshes them.
    Fetched(Arc<KeySet>),
}

/// What a valid token must also satisfy beyond its signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Seconds of clock skew allowed on `exp` and `nbf` (`PGWS_JWT_LEEWAY`).
    pub leeway: u64,
    /// PostgREST's `jwt-aud`: a token with an `aud` claim must name this (`PGWS_JWT_AUD`).
    pub audience: Option<String>,
    /// The token's `iss` must be this (`PGWS_JWT_ISS`).
    pub issuer: Option<String>,
}

impl Authorizer {
    /// `secret`: the resolved `PGWS_JWT_SECRET` text; `base64`: `PGWS_JWT_SECRET_BASE64`
    /// (applies when the secret is a raw HMAC secret, not a JWK or JWKS).
    pub fn from_secret(secret: &str, base64: bool) -> Result<Authorizer, SecretError> {
        Ok(Authorizer {
            keys: Keys::Configured(Arc::new(keys::parse_secret(secret, base64)?)),
            policy: Policy::default(),
        })
    }

    /// Verifies with the current keys of `keys` (a JWKS URL's), whatever they are at the time
    /// of each token; before the first document is installed every token is refused.
    pub fn from_key_set(keys: Arc<KeySet>) -> Authorizer {
        Authorizer {
            keys: Keys::Fetched(keys),
            policy: Policy::default(),
        }
    }

    /// The `kid` a token's header names when the keys come from a JWKS URL and the current set
    /// has no key with it (so a refresh might bring it). `None` for a configured secret, a
    /// token without `kid` or a known one, and a malformed token (verification refuses it).
    pub fn unknown_kid(&self, token: &str) -> Option<String> {
        let Keys::Fetched(set) = &self.keys else {
            return None;
        };
        verify::header_kid(token).filter(|kid| !set.contains_kid(kid))
    }

    /// The same keys with `policy` applied to every token.
    pub fn with_policy(mut self, policy: Policy) -> Authorizer {
        self.policy = policy;
        self
    }

    /// Validates the token and applies the claims rules. `now` is unix seconds (injected so
    /// tests control the clock); `requested_channel` is the `<channel>` of `/<channel>/<jwt>`.
    pub fn authorize(
        &self,
        token: &str,
        requested_channel: Option<&str>,
        now: u64,
    ) -> Result<Grant, Rejection> {
        self.verify(token, now)?.grant(requested_channel)
    }

    /// Validates the token (signature, `exp`, `nbf`, `mode`) without the channel rules, for
    /// protocols whose channel rules differ (postgrest-ws: a `channel` claim wins over the
    /// path).
    pub fn verify(&self, token: &str, now: u64) -> Result<Verified, Rejection> {
        // As in the reference, an empty token stands for an empty claims set (so the client
        // hears "Missing mode"), not for a malformed token.
        let (claims, expires_at) = if token.is_empty() {
            (Map::new(), None)
        } else {
            self.verify_claims(token, now)?
        };
        let mode = parse_mode(&claims)?;
        Ok(Verified {
            mode,
            claims,
            expires_at,
        })
    }

    /// Validates the token's signature, times, audience and issuer, and returns its claims and
    /// expiry, for protocols without a `mode` claim (`/live`, as PostgREST's tokens).
    pub fn verify_claims(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Map<String, Value>, Option<u64>), Rejection> {
        let ring = match &self.keys {
            Keys::Configured(ring) => Arc::clone(ring),
            Keys::Fetched(set) => set
                .ring()
                .ok_or_else(|| Rejection::Invalid("unknown key id".to_owned()))?,
        };
        let claims = verify::verify(&ring, token)?;
        let policy = &self.policy;
        let expires_at = claims::check_times(&claims, now, policy.leeway)?;
        claims::check_audience(&claims, policy.audience.as_deref())?;
        claims::check_issuer(&claims, policy.issuer.as_deref())?;
        Ok((claims, expires_at))
    }
}

/// A valid token, before the channel rules.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Read and/or write.
    pub mode: Mode,
    /// All claims of the token as sent.
    pub claims: Map<String, Value>,
    /// The `exp` claim as unix seconds (rounded up), if present.
    pub expires_at: Option<u64>,
}

impl Verified {
    /// The `channel` claim, when it is a string.
    pub fn channel_claim(&self) -> Option<&str> {
        claims::channel_claim(&self.claims)
    }

    /// Applies the postgres-websockets channel rules ([`allowed_channels`]).
    pub fn grant(self, requested_channel: Option<&str>) -> Result<Grant, Rejection> {
        let channels = allowed_channels(
            claims::channel_claim(&self.claims),
            &claims::channels_claim(&self.claims),
            requested_channel,
        )?;
        Ok(Grant {
            mode: self.mode,
            channels,
            claims: self.claims,
            expires_at: self.expires_at,
        })
    }
}
