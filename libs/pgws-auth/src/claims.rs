//! The claims rules of postgres-websockets, kept free of any cryptography.
//!
//! Once a token's signature is verified, its claims decide what the socket may do: `exp`/`nbf`
//! bound when, `mode` says read and/or write, and `channel`/`channels` (merged) together with
//! the channel requested in the URL path say where. These are pure functions of the claims so
//! they can be tested exhaustively (see the property tests) without signing anything.

use serde_json::{Map, Value};

use crate::Rejection;

/// What a socket may do on its channels, from the `mode` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `"r"`: receive notifications.
    Read,
    /// `"w"`: send notifications.
    Write,
    /// `"rw"`: both.
    ReadWrite,
}

impl Mode {
    /// Whether the socket receives the channels' notifications.
    pub fn can_read(self) -> bool {
        matches!(self, Mode::Read | Mode::ReadWrite)
    }

    /// Whether the socket's messages are sent as notifications.
    pub fn can_write(self) -> bool {
        matches!(self, Mode::Write | Mode::ReadWrite)
    }

    /// The claim value: `"r"`, `"w"` or `"rw"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Read => "r",
            Mode::Write => "w",
            Mode::ReadWrite => "rw",
        }
    }
}

/// Reads the `mode` claim: missing or not a string is [`Rejection::MissingMode`]; a string
/// other than `r`, `w`, `rw` is [`Rejection::InvalidMode`].
pub fn parse_mode(claims: &Map<String, Value>) -> Result<Mode, Rejection> {
    match claims.get("mode") {
        Some(Value::String(mode)) => match mode.as_str() {
            "r" => Ok(Mode::Read),
            "w" => Ok(Mode::Write),
            "rw" => Ok(Mode::ReadWrite),
            _ => Err(Rejection::InvalidMode),
        },
        _ => Err(Rejection::MissingMode),
    }
}

/// The legacy `channel` claim, when it is a string.
pub(crate) fn channel_claim(claims: &Map<String, Value>) -> Option<&str> {
    claims.get("channel").and_then(Value::as_str)
}

/// The string elements of the `channels` claim, when it is an array.
pub(crate) fn channels_claim(claims: &Map<String, Value>) -> Vec<String> {
    match claims.get("channels") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// The socket's channels: `channel` then `channels`, de-duplicated in order, narrowed to the
/// channel requested in the path if any. A requested channel is allowed alone when the token
/// names no channel at all; otherwise it must be one of them. Never `Ok` with an empty list.
pub fn allowed_channels(
    channel_claim: Option<&str>,
    channels_claim: &[String],
    requested: Option<&str>,
) -> Result<Vec<String>, Rejection> {
    let mut merged: Vec<&str> = Vec::with_capacity(channels_claim.len() + 1);
    for channel in channel_claim
        .into_iter()
        .chain(channels_claim.iter().map(String::as_str))
    {
        if !merged.contains(&channel) {
            merged.push(channel);
        }
    }
    match requested {
        Some(wanted) if merged.is_empty() || merged.contains(&wanted) => {
            Ok(vec![wanted.to_owned()])
        }
        Some(_) => Err(Rejection::NoAllowedChannels),
        None if merged.is_empty() => Err(Rejection::NoAllowedChannels),
        None => Ok(merged.into_iter().map(str::to_owned).collect()),
    }
}

/// A NumericDate claim (`exp`, `nbf`, `iat`) as seconds, when present (`null` is absent, as
/// in the reference's JSON decoding); any other non-number is an error.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Rejection> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| Rejection::Invalid(format!("invalid {name} claim"))),
        Some(_) => Err(Rejection::Invalid(format!("invalid {name} claim"))),
    }
}

/// Applies `exp` and `nbf` at `now` (unix seconds), both optional, with `leeway` seconds of
/// clock skew allowed both ways: expired when `exp + leeway <= now`, not yet valid when
/// `nbf - leeway > now`. Returns `exp + leeway` rounded up to whole seconds (when the socket
/// is closed), so that "expired" is exactly `expires_at <= now`.
pub(crate) fn check_times(
    claims: &Map<String, Value>,
    now: u64,
    leeway: u64,
) -> Result<Option<u64>, Rejection> {
    // `u64 -> f64` is exact for any realistic clock (below 2^53 seconds).
    #[allow(clippy::cast_precision_loss)]
    let (now_f, leeway_f) = (now as f64, leeway as f64);
    let exp = numeric_date(claims, "exp")?.map(|exp| exp + leeway_f);
    if exp.is_some_and(|exp| exp <= now_f) {
        return Err(Rejection::Expired);
    }
    if numeric_date(claims, "nbf")?.is_some_and(|nbf| nbf - leeway_f > now_f) {
        return Err(Rejection::Invalid("token not yet valid (nbf)".to_owned()));
    }
    numeric_date(claims, "iat")?;
    // exp > now >= 0 here, so the cast (saturating for huge values) loses nothing that matters.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(exp.map(|exp| exp.ceil() as u64))
}

/// PostgREST's `jwt-aud` rule: with an audience configured, a token whose `aud` (a string or
/// an array of strings) does not name it is refused; a token without `aud` is accepted.
pub(crate) fn check_audience(
    claims: &Map<String, Value>,
    audience: Option<&str>,
) -> Result<(), Rejection> {
    let Some(wanted) = audience else {
        return Ok(());
    };
    let named = match claims.get("aud") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(aud)) => aud == wanted,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(wanted)),
        Some(_) => false,
    };
    if named {
        Ok(())
    } else {
        Err(Rejection::Invalid("JWT not in audience".to_owned()))
    }
}

/// With an issuer configured, the token's `iss` must be present and equal to it.
pub(crate) fn check_issuer(
    claims: &Map<String, Value>,
    issuer: Option<&str>,
) -> Result<(), Rejection> {
    match issuer {
        Some(wanted) if claims.get("iss").and_then(Value::as_str) != Some(wanted) => {
            Err(Rejection::Invalid("JWT issuer not accepted".to_owned()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode(&map(json!({"mode": "r"}))), Ok(Mode::Read));
        assert_eq!(parse_mode(&map(json!({"mode": "w"}))), Ok(Mode::Write));
        assert_eq!(parse_mode(&map(json!({"mode": "rw"}))), Ok(Mode::ReadWrite));
        assert_eq!(parse_mode(&map(json!({}))), Err(Rejection::MissingMode));
        assert_eq!(
            parse_mode(&map(json!({"mode": 1}))),
            Err(Rejection::MissingMode)
        );
        assert_eq!(
            parse_mode(&map(json!({"mode": null}))),
            Err(Rejection::MissingMode)
        );
        assert_eq!(
            parse_mode(&map(json!({"mode": ["r"]}))),
            Err(Rejection::MissingMode)
        );
        for bad in ["", "wr", "R", "read", "rw "] {
            assert_eq!(
                parse_mode(&map(json!({ "mode": bad }))),
                Err(Rejection::InvalidMode),
                "{bad}"
            );
        }
    }

    #[test]
    fn mode_capabilities() {
        assert!(Mode::Read.can_read() && !Mode::Read.can_write());
        assert!(!Mode::Write.can_read() && Mode::Write.can_write());
        assert!(Mode::ReadWrite.can_read() && Mode::ReadWrite.can_write());
        assert_eq!(
            [
                Mode::Read.as_str(),
                Mode::Write.as_str(),
                Mode::ReadWrite.as_str()
            ],
            ["r", "w", "rw"]
        );
    }

    #[test]
    fn channel_claims_extraction() {
        let claims = map(json!({"channel": "a", "channels": ["b", 1, null, "c", {"x": 1}]}));
        assert_eq!(channel_claim(&claims), Some("a"));
        assert_eq!(channels_claim(&claims), strings(&["b", "c"]));
        let odd = map(json!({"channel": 5, "channels": "b"}));
        assert_eq!(channel_claim(&odd), None);
        assert!(channels_claim(&odd).is_empty());
    }

    #[test]
    fn merge_keeps_order_and_drops_duplicates() {
        let got = allowed_channels(Some("b"), &strings(&["a", "b", "c", "a"]), None);
        assert_eq!(got, Ok(strings(&["b", "a", "c"])));
        assert_eq!(allowed_channels(Some("x"), &[], None), Ok(strings(&["x"])));
        assert_eq!(
            allowed_channels(None, &strings(&["x", "y"]), None),
            Ok(strings(&["x", "y"]))
        );
    }

    #[test]
    fn no_channels_without_request_is_refused() {
        assert_eq!(
            allowed_channels(None, &[], None),
            Err(Rejection::NoAllowedChannels)
        );
    }

    #[test]
    fn requested_channel_rules() {
        assert_eq!(
            allowed_channels(None, &[], Some("free")),
            Ok(strings(&["free"]))
        );
        assert_eq!(
            allowed_channels(Some("a"), &strings(&["b"]), Some("b")),
            Ok(strings(&["b"]))
        );
        assert_eq!(
            allowed_channels(Some("a"), &strings(&["b"]), Some("a")),
            Ok(strings(&["a"]))
        );
        assert_eq!(
            allowed_channels(Some("a"), &[], Some("z")),
            Err(Rejection::NoAllowedChannels)
        );
        assert_eq!(
            allowed_channels(None, &strings(&["b"]), Some("z")),
            Err(Rejection::NoAllowedChannels)
        );
    }

    #[test]
    fn times() {
        let now = 1_000;
        assert_eq!(check_times(&map(json!({})), now, 0), Ok(None));
        assert_eq!(
            check_times(&map(json!({"exp": 1_001})), now, 0),
            Ok(Some(1_001))
        );
        assert_eq!(
            check_times(&map(json!({"exp": 1_000})), now, 0),
            Err(Rejection::Expired)
        );
        assert_eq!(
            check_times(&map(json!({"exp": -5})), now, 0),
            Err(Rejection::Expired)
        );
        assert_eq!(
            check_times(&map(json!({"exp": 1_000.5})), now, 0),
            Ok(Some(1_001))
        );
        assert_eq!(
            check_times(&map(json!({"exp": 999.5})), now, 0),
            Err(Rejection::Expired)
        );
        assert_eq!(check_times(&map(json!({"nbf": 1_000})), now, 0), Ok(None));
        assert_eq!(
            check_times(&map(json!({"nbf": 1_001})), now, 0),
            Err(Rejection::Invalid("token not yet valid (nbf)".to_owned()))
        );
        assert_eq!(
            check_times(&map(json!({"exp": "tomorrow"})), now, 0),
            Err(Rejection::Invalid("invalid exp claim".to_owned()))
        );
        assert_eq!(
            check_times(&map(json!({"nbf": null, "exp": null})), now, 0),
            Ok(None)
        );
        assert_eq!(
            check_times(&map(json!({"nbf": "soon"})), now, 0),
            Err(Rejection::Invalid("invalid nbf claim".to_owned()))
        );
        assert_eq!(
            check_times(&map(json!({"iat": "x"})), now, 0),
            Err(Rejection::Invalid("invalid iat claim".to_owned()))
        );
    }

    #[test]
    fn leeway_stretches_exp_and_nbf() {
        let now = 1_000;
        assert_eq!(
            check_times(&map(json!({"exp": 995})), now, 10),
            Ok(Some(1_005))
        );
        assert_eq!(
            check_times(&map(json!({"exp": 990})), now, 10),
            Err(Rejection::Expired)
        );
        assert!(check_times(&map(json!({"nbf": 1_010})), now, 10).is_ok());
        assert!(check_times(&map(json!({"nbf": 1_011})), now, 10).is_err());
    }

    #[test]
    fn audience_and_issuer() {
        let aud = Some("pgws");
        assert!(check_audience(&map(json!({})), aud).is_ok());
        assert!(check_audience(&map(json!({"aud": "pgws"})), aud).is_ok());
        assert!(check_audience(&map(json!({"aud": ["x", "pgws"]})), aud).is_ok());
        assert!(check_audience(&map(json!({"aud": "other"})), aud).is_err());
        assert!(check_audience(&map(json!({"aud": 5})), aud).is_err());
        assert!(check_audience(&map(json!({"aud": "other"})), None).is_ok());
        let iss = Some("https://auth.example");
        assert!(check_issuer(&map(json!({"iss": "https://auth.example"})), iss).is_ok());
        assert!(check_issuer(&map(json!({"iss": "https://evil"})), iss).is_err());
        assert!(check_issuer(&map(json!({})), iss).is_err());
        assert!(check_issuer(&map(json!({})), None).is_ok());
    }
}
