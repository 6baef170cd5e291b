//! What the fuzz targets share: JSON values built from fuzz input (biased towards the names
//! the code looks at, so that the fuzzer meets its branches early), and small models of what
//! the outside world accepts (a NATS subject, PostgreSQL's `jsonb`, JSON without repeated
//! member names) that the targets hold the code's outputs to.

use std::collections::HashSet;
use std::fmt;

use arbitrary::{Result, Unstructured};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The clock of the targets that verify tokens (unix seconds, 2023-11-14).
pub const NOW: u64 = 1_700_000_000;

/// The HMAC secret the token targets sign with (`PGWS_JWT_SECRET`).
pub const SECRET: &str = "reallyreallyreallyreallyverysafe";

/// Member names the code reads: claims, JOSE header members, envelope fields.
const NAMES: &[&str] = &[
    "mode",
    "channel",
    "channels",
    "exp",
    "nbf",
    "iat",
    "aud",
    "iss",
    "gaps",
    "message_delivered_at",
    "event",
    "payload",
    "claims",
    "alg",
    "kid",
    "crit",
    "typ",
];

/// Channel names worth meeting often: plain, the reference's, with the characters that mean
/// something in a URL or a NATS subject, and the longest PostgreSQL allows and one more.
pub fn channel(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=7)? {
        0 => "chat".to_owned(),
        1 => "room-1".to_owned(),
        2 => "a.b*c>d e".to_owned(),
        3 => "c".repeat(63),
        4 => "c".repeat(64),
        5 => String::new(),
        _ => u.arbitrary()?,
    })
}

/// A member name: usually one the code reads.
pub fn key(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(3, 4)? {
        Ok((*u.choose(NAMES)?).to_owned())
    } else {
        u.arbitrary()
    }
}

/// A JSON number: integers and floats, near the targets' clock or anywhere.
pub fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=4)? {
        0 => Value::from(NOW.wrapping_add_signed(i64::from(u.arbitrary::<i16>()?))),
        1 => Value::from(u.arbitrary::<i64>()?),
        2 => Value::from(u.arbitrary::<u64>()?),
        _ => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
    })
}

/// Any JSON value, at most `depth` containers deep.
pub fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let kinds = if depth == 0 { 4 } else { 6 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 | 4 => Value::String(if u.arbitrary()? {
            channel(u)?
        } else {
            u.arbitrary()?
        }),
        5 => {
            let n = u.int_in_range(0..=4)?;
            let items = (0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?;
            Value::Array(items)
        }
        _ => Value::Object(object(u, depth - 1)?),
    })
}

/// A JSON object, at most `depth` containers deep below it.
pub fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for _ in 0..u.int_in_range(0..=6)? {
        map.insert(key(u)?, value(u, depth)?);
    }
    Ok(map)
}

/// Token claims: any object, usually with a valid `mode`, channel claims and time claims.
pub fn claims(u: &mut Unstructured<'_>) -> Result<Map<String, Value>> {
    let mut claims = object(u, 2)?;
    if u.ratio(3, 4)? {
        let mode = *u.choose(&["r", "w", "rw", "x"])?;
        claims.insert("mode".to_owned(), Value::from(mode));
    }
    if u.arbitrary()? {
        claims.insert("channel".to_owned(), Value::from(channel(u)?));
    }
    if u.arbitrary()? {
        let n = u.int_in_range(0..=3)?;
        let channels = (0..n).map(|_| channel(u).map(Value::from));
        let channels = channels.collect::<Result<_>>()?;
        claims.insert("channels".to_owned(), Value::Array(channels));
    }
    for time in ["exp", "nbf"] {
        if u.ratio(1, 3)? {
            claims.insert(time.to_owned(), number(u)?);
        }
    }
    Ok(claims)
}

/// Whether `token` is a NATS subject token that matches only itself: not empty, no `.`,
/// `*`, `>`, whitespace or control characters.
pub fn literal_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
}

/// Whether `subject` is a NATS subject of literal tokens (no wildcard, nothing empty).
pub fn literal_subject(subject: &str) -> bool {
    subject.split('.').all(literal_token)
}

/// Whether PostgreSQL's `jsonb` input takes `text`: valid JSON whose string escapes hold no
/// `\u0000` and no unpaired UTF-16 surrogate. (serde_json's raw values and skipped members
/// let both kinds of escape through; numbers beyond `f64` are fine for `jsonb`.)
pub fn jsonb_accepts(text: &str) -> bool {
    serde_json::from_str::<de::IgnoredAny>(text).is_ok() && escapes_fit_jsonb(text)
}

/// The escapes of valid JSON `text` (backslashes only occur in strings there): no
/// `\u0000`, every high surrogate followed at once by a low one and every low one preceded
/// by a high one.
fn escapes_fit_jsonb(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut high_pending = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            if high_pending {
                return false;
            }
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            if high_pending {
                return false;
            }
            i += 2;
            continue;
        }
        let Some(unit) = text
            .get(i + 2..i + 6)
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
        else {
            return false;
        };
        match unit {
            0 => return false,
            0xD800..=0xDBFF if high_pending => return false,
            0xD800..=0xDBFF => high_pending = true,
            0xDC00..=0xDFFF if !high_pending => return false,
            0xDC00..=0xDFFF => high_pending = false,
            _ if high_pending => return false,
            _ => {}
        }
        i += 6;
    }
    !high_pending
}

/// JSON parsed while refusing an object that repeats a member name, at any depth.
pub struct Unique(pub Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<Unique, E> {
        Ok(Unique(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::from(v)))
    }

    fn visit_unit<E>(self) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Unique, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Unique(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Unique, A::Error> {
        let mut seen = HashSet::new();
        let mut object = Map::new();
        while let Some((name, Unique(item))) = map.next_entry::<String, Unique>()? {
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(format!("member {name:?} repeated")));
            }
            object.insert(name, item);
        }
        Ok(Unique(Value::Object(object)))
    }
}

/// `text` as JSON, or why not (a repeated member name included).
pub fn parse_unique(text: &str) -> std::result::Result<Value, String> {
    serde_json::from_str::<Unique>(text)
        .map(|u| u.0)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jsonb_model() {
        assert!(jsonb_accepts(
            r#"{"a":"\ud83d\ude00","b":1e400,"c":"\\u0000"}"#
        ));
        for refused in [
            r#"{"a":"\u0000"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"a":"\ud800x"}"#,
            r#"{"a":"\ud800\n"}"#,
            r#"{"a":"\ud800\ud800"}"#,
            "{",
        ] {
            assert!(!jsonb_accepts(refused), "{refused}");
        }
    }

    #[test]
    fn repeated_members_are_found() {
        assert!(parse_unique(r#"{"a":{"b":1,"c":[{"d":2}]}}"#).is_ok());
        assert!(parse_unique(r#"{"a":1,"a":2}"#).is_err());
        assert!(parse_unique(r#"[{"a":{"b":1,"b":1}}]"#).is_err());
    }

    #[test]
    fn subjects() {
        assert!(literal_subject("pgws.deliver.chat"));
        for bad in ["", "a..b", "a.*", "a.>", "a b", "a.\u{85}"] {
            assert!(!literal_subject(bad), "{bad:?}");
        }
    }
}
