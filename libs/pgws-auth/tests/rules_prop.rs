//! Property tests of the pure claims rules (`allowed_channels`, `parse_mode`).
//!
//! Channel names come from a tiny alphabet so that duplicates, and requested channels that
//! are (or are not) in the claims, happen often.

use pgws_auth::{allowed_channels, parse_mode, Mode, Rejection};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn channel() -> impl Strategy<Value = String> {
    "[a-d]{0,2}"
}

/// `channel` then `channels`, first occurrences only.
fn merged(channel_claim: Option<&String>, channels: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in channel_claim.into_iter().chain(channels) {
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}

proptest! {
    #[test]
    fn allowed_channels_properties(
        channel_claim in proptest::option::of(channel()),
        channels in proptest::collection::vec(channel(), 0..6),
        requested in proptest::option::of(channel()),
    ) {
        let result = allowed_channels(channel_claim.as_deref(), &channels, requested.as_deref());
        let claimed = merged(channel_claim.as_ref(), &channels);

        match &result {
            Ok(got) => {
                prop_assert!(!got.is_empty());
                for c in got {
                    prop_assert!(requested.as_ref() == Some(c) || claimed.contains(c));
                }
            }
            Err(e) => prop_assert_eq!(e, &Rejection::NoAllowedChannels),
        }

        match &requested {
            Some(rq) if claimed.is_empty() => prop_assert_eq!(&result, &Ok(vec![rq.clone()])),
            Some(rq) => {
                prop_assert_eq!(result == Ok(vec![rq.clone()]), claimed.contains(rq));
                prop_assert_eq!(result.is_err(), !claimed.contains(rq));
            }
            None if claimed.is_empty() => prop_assert_eq!(&result, &Err(Rejection::NoAllowedChannels)),
            None => {
                let got = result.clone().unwrap_or_default();
                prop_assert_eq!(&got, &claimed);
                if let Some(first) = &channel_claim {
                    prop_assert_eq!(got.first(), Some(first));
                }
            }
        }
    }

    #[test]
    fn parse_mode_accepts_exactly_r_w_rw(mode in "[rwx ]{0,3}") {
        let mut claims = Map::new();
        claims.insert("mode".to_owned(), Value::String(mode.clone()));
        match parse_mode(&claims) {
            Ok(parsed) => {
                prop_assert_eq!(parsed.as_str(), mode.as_str());
                prop_assert_eq!(parsed.can_read(), mode.contains('r'));
                prop_assert_eq!(parsed.can_write(), mode.contains('w'));
            }
            Err(e) => {
                prop_assert!(!["r", "w", "rw"].contains(&mode.as_str()));
                prop_assert_eq!(e, Rejection::InvalidMode);
            }
        }
    }

    #[test]
    fn non_string_mode_is_missing(n in any::<i64>(), b in any::<bool>()) {
        for value in [json!(n), json!(b), json!(null), json!([]), json!({})] {
            let mut claims = Map::new();
            claims.insert("mode".to_owned(), value);
            prop_assert_eq!(parse_mode(&claims), Err::<Mode, _>(Rejection::MissingMode));
        }
    }
}
