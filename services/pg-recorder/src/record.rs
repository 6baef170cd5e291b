//! Turning an audit record into a row, or into a dead letter with the reason.
//!
//! A record is one postgres-websockets envelope with its id (the `Nats-Msg-Id` it was appended
//! with, [`pgws_bus::Record::id`]) and the `Pgws-Notify-Channel` header (see
//! `proto/CONTRACT.md`). Anything else is malformed: it is kept in `pgws_audit.dead_letters`
//! and never blocks the stream. The in-transaction writer parses its envelopes here too, so
//! both paths make the same rows and the same dead letters.
//!
//! An outcome record (`Pgws-Outcome: failed`) lists messages recorded earlier whose NOTIFY the
//! gateway gave up on, with the reason as its body: it becomes rows of
//! `pgws_audit.notify_failures`.

use pgws_bus::Headers;
use pgws_proto::headers;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// What came with a record's body: its id and its headers. `Nats-Msg-Id` is the id whether
/// or not the headers hold one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta<'a> {
    pub(crate) id: Option<&'a str>,
    pub(crate) headers: &'a Headers,
}

impl<'a> Meta<'a> {
    pub(crate) fn new(id: Option<&'a str>, headers: &'a Headers) -> Self {
        Self { id, headers }
    }

    /// The header `name` (the id for `Nats-Msg-Id`).
    pub(crate) fn get(&self, name: &str) -> Option<&'a str> {
        if name == headers::MSG_ID {
            return self.id;
        }
        self.headers.get(name).map(String::as_str)
    }
}

/// A record's id and headers, owned (tests, fuzzing, the in-transaction writer), set as NATS
/// headers are: `Nats-Msg-Id` is the id.
#[derive(Debug, Clone, Default)]
pub(crate) struct OwnedMeta {
    pub(crate) id: Option<String>,
    pub(crate) headers: Headers,
}

impl OwnedMeta {
    /// Sets the header `name` (the id for `Nats-Msg-Id`).
    pub(crate) fn insert(&mut self, name: &str, value: &str) {
        if name == headers::MSG_ID {
            self.id = Some(value.to_owned());
        } else {
            self.headers.insert(name.to_owned(), value.to_owned());
        }
    }

    pub(crate) fn meta(&self) -> Meta<'_> {
        Meta::new(self.id.as_deref(), &self.headers)
    }
}

/// A well-formed audit record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) channel: String,
    pub(crate) event: String,
    pub(crate) payload: String,
    /// The claims as JSON text (with `message_delivered_at`).
    pub(crate) claims: String,
    /// `message_delivered_at`: when the gateway accepted the message, unix seconds.
    pub(crate) received_at: f64,
    pub(crate) notify_channel: String,
    /// The envelope exactly as notified (what a dispatcher function receives).
    pub(crate) envelope: String,
}

/// A message that cannot be recorded, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeadLetter {
    /// The stream and sequence the record had (unique per stack).
    pub(crate) stream: String,
    pub(crate) stream_seq: i64,
    /// The envelope's position in a record of several (0 otherwise, or for the whole record).
    pub(crate) part: i32,
    pub(crate) msg_id: Option<String>,
    pub(crate) reason: String,
    pub(crate) data: String,
    /// The headers as a JSON object of arrays.
    pub(crate) headers: String,
}

/// Messages that were recorded but not NOTIFYed, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub(crate) ids: Vec<String>,
    pub(crate) reason: String,
}

/// Longest failure reason kept, in bytes.
const MAX_REASON: usize = 1024;

/// The records of one pulled batch, in stream order, and its dead letters.
#[derive(Debug, Default, Clone)]
pub(crate) struct Batch {
    pub(crate) records: Vec<Record>,
    /// Where each record was: `(stream, stream sequence, part)`, parallel to `records`.
    pub(crate) positions: Vec<(String, u64, i32)>,
    pub(crate) dead: Vec<DeadLetter>,
    /// NOTIFY failures reported by the gateways.
    pub(crate) failures: Vec<Failure>,
    /// Some message of the batch was delivered before (a row for it may exist already).
    pub(crate) redelivered: bool,
}

impl Batch {
    /// Parses one stream message (one envelope, or several with `Pgws-Msg-Ids`) and adds each
    /// envelope to the records or to the dead letters.
    pub(crate) fn push(&mut self, stream: &str, seq: u64, data: &[u8], hdrs: Meta<'_>) {
        if let Some(outcome) = hdrs.get(headers::OUTCOME) {
            match failure(outcome, data, hdrs) {
                Ok(f) => self.failures.push(f),
                Err(reason) => self.push_dead(dead_letter(stream, seq, data, hdrs, reason)),
            }
            return;
        }
        let Some(ids) = hdrs.get(headers::MSG_IDS) else {
            self.push_part(stream, seq, 0, data, hdrs);
            return;
        };
        let ids: Vec<&str> = ids.split(',').collect();
        let parts: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
        if ids.len() != parts.len() || ids.iter().any(|id| id.is_empty()) {
            let reason = format!(
                "{} lists {} ids for {} envelopes",
                headers::MSG_IDS,
                ids.len(),
                parts.len()
            );
            self.push_dead(dead_letter(stream, seq, data, hdrs, reason));
            return;
        }
        let channel = hdrs.get(headers::NOTIFY_CHANNEL).unwrap_or("");
        let mut h = Headers::new();
        h.insert(headers::NOTIFY_CHANNEL.to_owned(), channel.to_owned());
        for (part, (id, body)) in ids.iter().zip(parts).enumerate() {
            let part = i32::try_from(part).unwrap_or(i32::MAX);
            self.push_part(stream, seq, part, body, Meta::new(Some(id), &h));
        }
    }

    fn push_part(&mut self, stream: &str, seq: u64, part: i32, data: &[u8], hdrs: Meta<'_>) {
        match parse(stream, seq, data, hdrs) {
            Ok(r) => {
                self.records.push(r);
                self.positions.push((stream.to_owned(), seq, part));
            }
            Err(mut d) => {
                d.part = part;
                self.push_dead(*d);
            }
        }
    }

    fn push_dead(&mut self, d: DeadLetter) {
        tracing::warn!(
            seq = d.stream_seq,
            part = d.part,
            reason = d.reason,
            "dead letter"
        );
        self.dead.push(d);
    }

    /// Messages in the batch.
    pub(crate) fn len(&self) -> usize {
        self.records.len() + self.dead.len() + self.failures.len()
    }
}

/// Parses an outcome record: `Pgws-Outcome: failed`, the ids in `Pgws-Msg-Ids`, the reason as
/// the body (cut to [`MAX_REASON`] bytes).
fn failure(outcome: &str, data: &[u8], hdrs: Meta<'_>) -> Result<Failure, String> {
    if outcome != headers::OUTCOME_FAILED {
        return Err(format!("unknown {} {outcome:?}", headers::OUTCOME));
    }
    let ids = hdrs.get(headers::MSG_IDS).unwrap_or_default();
    let ids: Vec<String> = ids.split(',').map(str::to_owned).collect();
    if ids.iter().any(|id| id.is_empty() || id.contains('\0')) {
        return Err(format!(
            "an outcome record needs {} without empty ids",
            headers::MSG_IDS
        ));
    }
    let mut reason = String::from_utf8_lossy(data).replace('\0', "\u{fffd}");
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    Ok(Failure { ids, reason })
}

/// The first second `message_delivered_at` may not reach: 10000-01-01 UTC. Daily partitions
/// are named `messages_YYYYMMDD` and compared as text, which needs four-digit years.
const LATEST: f64 = 253_402_300_800.0;

/// The envelope's fields, borrowed where no escape was in the way; the claims as raw JSON.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    payload: Cow<'a, str>,
    #[serde(borrow)]
    claims: &'a RawValue,
}

#[derive(Deserialize)]
struct Time {
    message_delivered_at: f64,
}

/// Parses one message; `stream` and `seq` say where it was.
pub(crate) fn parse(
    stream: &str,
    seq: u64,
    data: &[u8],
    hdrs: Meta<'_>,
) -> Result<Record, Box<DeadLetter>> {
    fast_parse(data, hdrs).map_or_else(|| checked_parse(stream, seq, data, hdrs), Ok)
}

/// The common case, without building a JSON tree: a well-formed envelope with no escaped NUL
/// and no escaped surrogate anywhere. `None` sends the message to [`checked_parse`], which
/// says what is wrong with it.
pub(crate) fn fast_parse(data: &[u8], hdrs: Meta<'_>) -> Option<Record> {
    let id = hdrs.get(headers::MSG_ID)?;
    let notify_channel = hdrs.get(headers::NOTIFY_CHANNEL).unwrap_or("");
    let text = std::str::from_utf8(data).ok()?;
    let suspicious = |s: &str| s.contains('\0') || s.contains("\\u0000") || has_surrogate_escape(s);
    if id.is_empty() || suspicious(text) || suspicious(id) || suspicious(notify_channel) {
        return None;
    }
    // A struct also deserializes from a JSON array: only objects are envelopes.
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let fields: Fields<'_> = serde_json::from_str(text).ok()?;
    let claims = fields.claims.get();
    if !claims.starts_with('{') {
        return None;
    }
    let received_at = serde_json::from_str::<Time>(claims)
        .ok()?
        .message_delivered_at;
    if !(0.0..LATEST).contains(&received_at) {
        return None;
    }
    Some(Record {
        id: id.to_owned(),
        channel: fields.channel.into_owned(),
        event: fields.event.into_owned(),
        payload: fields.payload.into_owned(),
        claims: claims.to_owned(),
        received_at,
        notify_channel: notify_channel.to_owned(),
        envelope: text.to_owned(),
    })
}

/// Whether `text` holds an escaped UTF-16 surrogate (`\ud800` to `\udfff`). The claims are
/// kept as raw JSON and serde_json does not check the escapes of what it skips, while
/// PostgreSQL's `jsonb` refuses an unpaired surrogate: such a record takes the checked parse,
/// which reads every string (a proper pair is fine there).
fn has_surrogate_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices("\\u").any(|(i, _)| {
        matches!(bytes.get(i + 2), Some(b'd' | b'D'))
            && matches!(
                bytes.get(i + 3),
                Some(b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
            )
    })
}

/// Parses one message with every check, saying why it is malformed.
pub(crate) fn checked_parse(
    stream: &str,
    seq: u64,
    data: &[u8],
    hdrs: Meta<'_>,
) -> Result<Record, Box<DeadLetter>> {
    let header = |name: &str| hdrs.get(name).map(str::to_owned);
    let msg_id = header(headers::MSG_ID);
    let dead = |reason: String| Box::new(dead_letter(stream, seq, data, hdrs, reason));
    let Some(id) = msg_id.clone().filter(|id| !id.is_empty()) else {
        return Err(dead(format!("no {} header", headers::MSG_ID)));
    };
    let notify_channel = header(headers::NOTIFY_CHANNEL).unwrap_or_default();
    let Ok(text) = std::str::from_utf8(data) else {
        return Err(dead("not UTF-8".to_owned()));
    };
    if text.contains('\0') || id.contains('\0') || notify_channel.contains('\0') {
        return Err(dead("contains a NUL character".to_owned()));
    }
    let Ok(Value::Object(envelope)) = serde_json::from_str::<Value>(text) else {
        return Err(dead("not a JSON object".to_owned()));
    };
    let string = |field: &str| match envelope.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(format!("no string \"{field}\"")),
    };
    let fields = (string("event"), string("channel"), string("payload"));
    let (event, channel, payload) = match fields {
        (Ok(e), Ok(c), Ok(p)) => (e, c, p),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Err(dead(e)),
    };
    let Some(Value::Object(claims)) = envelope.get("claims") else {
        return Err(dead("no \"claims\" object".to_owned()));
    };
    let Some(received_at) = claims.get("message_delivered_at").and_then(Value::as_f64) else {
        return Err(dead("no numeric claims.message_delivered_at".to_owned()));
    };
    if !(0.0..LATEST).contains(&received_at) {
        return Err(dead(
            "claims.message_delivered_at is not between 1970 and 9999".to_owned(),
        ));
    }
    // PostgreSQL text and jsonb cannot hold NUL, even escaped.
    if [&event, &channel, &payload]
        .iter()
        .any(|s| s.contains('\0'))
        || claims.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
    {
        return Err(dead("contains a NUL character".to_owned()));
    }
    Ok(Record {
        id,
        channel,
        event,
        payload,
        claims: Value::Object(claims.clone()).to_string(),
        received_at,
        notify_channel,
        envelope: text.to_owned(),
    })
}

/// A dead letter for the message at `seq` (part 0), with NULs made printable.
fn dead_letter(stream: &str, seq: u64, data: &[u8], hdrs: Meta<'_>, reason: String) -> DeadLetter {
    DeadLetter {
        stream: stream.to_owned(),
        stream_seq: i64::try_from(seq).unwrap_or(i64::MAX),
        part: 0,
        msg_id: hdrs
            .get(headers::MSG_ID)
            .map(|id| id.replace('\0', "\u{fffd}")),
        reason,
        data: String::from_utf8_lossy(data).replace('\0', "\u{fffd}"),
        headers: headers_json(hdrs),
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The headers (the id as `Nats-Msg-Id`) as a JSON object of arrays, as NATS headers may
/// repeat a name (a record's headers hold one value per name).
fn headers_json(hdrs: Meta<'_>) -> String {
    let printable = |s: &str| s.replace('\0', "\u{fffd}");
    let mut map = Map::new();
    for (name, value) in hdrs.headers {
        map.insert(printable(name), Value::Array(vec![printable(value).into()]));
    }
    if let Some(id) = hdrs.id {
        map.insert(
            headers::MSG_ID.to_owned(),
            Value::Array(vec![printable(id).into()]),
        );
    }
    Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(id: Option<&str>) -> OwnedMeta {
        let mut h = OwnedMeta::default();
        if let Some(id) = id {
            h.insert(headers::MSG_ID, id);
        }
        h.insert(headers::NOTIFY_CHANNEL, "listen");
        h
    }

    const GOOD: &str = r#"{"event":"WebsocketMessage","channel":"chat","payload":"hi","claims":{"mode":"rw","message_delivered_at":1700000000.5}}"#;

    #[test]
    fn a_good_record_parses() {
        let r = parse("s", 1, GOOD.as_bytes(), hdrs(Some("g-1")).meta()).expect("good");
        assert_eq!(
            (r.id.as_str(), r.channel.as_str(), r.event.as_str()),
            ("g-1", "chat", "WebsocketMessage")
        );
        assert_eq!(
            (r.payload.as_str(), r.notify_channel.as_str()),
            ("hi", "listen")
        );
        assert!((r.received_at - 1_700_000_000.5).abs() < 1e-6);
        assert_eq!(r.envelope, GOOD);
        assert!(r.claims.contains("\"mode\":\"rw\""));
    }

    #[test]
    fn the_fast_parse_agrees_with_the_checked_one() {
        let cases = [
            GOOD,
            r#"{"event":"WebsocketMessage","channel":"c\"h\u00e9","payload":"line\nbreak \\u0041","claims":{"message_delivered_at":1700000000,"channels":["a","b"],"n":{"x":null}}}"#,
            r#" { "claims" : { "message_delivered_at" : 1.5e9 } , "payload":"", "channel":"ç", "event":"E", "extra": [1] } "#,
        ];
        for case in cases {
            let h = hdrs(Some("id-1"));
            let fast = fast_parse(case.as_bytes(), h.meta()).expect(case);
            let checked = checked_parse("s", 1, case.as_bytes(), h.meta()).expect(case);
            let json = |s: &str| serde_json::from_str::<Value>(s).expect("claims");
            assert_eq!(json(&fast.claims), json(&checked.claims), "{case}");
            assert_eq!(
                Record {
                    claims: String::new(),
                    ..fast
                },
                Record {
                    claims: String::new(),
                    ..checked
                },
                "{case}"
            );
        }
        // What the fast parse leaves to the checked one.
        for odd in [
            r#"["E","c","p",{"message_delivered_at":1}]"#,
            r#"{"event":"E","channel":"c","payload":"\u0000","claims":{"message_delivered_at":1}}"#,
            r#"{"event":"E","channel":"c","payload":"p","claims":{"message_delivered_at":"1"}}"#,
            r#"{"event":"E","channel":"c","payload":"p","claims":[1]}"#,
        ] {
            assert!(
                fast_parse(odd.as_bytes(), hdrs(Some("x")).meta()).is_none(),
                "{odd}"
            );
        }
    }

    #[test]
    fn a_record_of_several_envelopes_is_split_in_order() {
        let bad = r#"{"event":"E","channel":"c","payload":"p"}"#;
        let body = format!("{GOOD}\n{bad}\n{GOOD}");
        let mut h = hdrs(Some("a"));
        h.insert(headers::MSG_IDS, "a,b,c");
        let mut batch = Batch::default();
        batch.push("s", 9, body.as_bytes(), h.meta());
        let ids: Vec<&str> = batch.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(
            batch.positions,
            [("s".to_owned(), 9, 0), ("s".to_owned(), 9, 2)]
        );
        assert!(batch
            .records
            .iter()
            .all(|r| r.notify_channel == "listen" && r.envelope == GOOD));
        assert_eq!(batch.dead.len(), 1);
        let d = &batch.dead[0];
        assert_eq!(
            (d.stream_seq, d.part, d.msg_id.as_deref()),
            (9, 1, Some("b"))
        );
        assert_eq!(d.reason, "no \"claims\" object");
        assert_eq!(batch.len(), 3);

        // Ids and envelopes that do not pair up: the whole record is one dead letter.
        h.insert(headers::MSG_IDS, "a,b");
        let mut batch = Batch::default();
        batch.push("s", 10, body.as_bytes(), h.meta());
        assert!(batch.records.is_empty());
        assert_eq!(batch.dead.len(), 1);
        assert_eq!(
            batch.dead[0].reason,
            "Pgws-Msg-Ids lists 2 ids for 3 envelopes"
        );
        assert_eq!(batch.dead[0].part, 0);
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/recorder_record.rs`): the fast parse kept an
    /// escaped unpaired surrogate in the claims, which PostgreSQL's `jsonb` refuses, failing
    /// the transaction of the whole batch.
    #[test]
    fn escaped_unpaired_surrogates_are_malformed() {
        let with = |claim: &str| {
            format!(
                r#"{{"event":"E","channel":"c","payload":"p","claims":{{"x":"{claim}","message_delivered_at":1}}}}"#
            )
        };
        for lone in [r"a\udc00b", r"\ud800", r"\uD83D", r"\ud83d\u0041"] {
            let record = with(lone);
            let h = hdrs(Some("x"));
            assert!(fast_parse(record.as_bytes(), h.meta()).is_none(), "{lone}");
            let err = parse("s", 1, record.as_bytes(), h.meta()).expect_err(lone);
            assert_eq!(err.reason, "not a JSON object");
        }
        let pair = with(r"\ud83d\ude00");
        let r = parse("s", 1, pair.as_bytes(), hdrs(Some("x")).meta()).expect("a pair");
        assert_eq!(r.claims, "{\"message_delivered_at\":1,\"x\":\"\u{1f600}\"}");
        assert!(!has_surrogate_escape(r"\ud7ff\ue000\u00d8"));
        assert!(has_surrogate_escape(r"\uDFFF") && has_surrogate_escape(r"\udA00"));
    }

    #[test]
    fn malformed_records_say_why() {
        let cases: [(&[u8], Option<&str>, &str); 9] = [
            (GOOD.as_bytes(), None, "no Nats-Msg-Id header"),
            (b"\xff\xfe", Some("x"), "not UTF-8"),
            (b"[1,2]", Some("x"), "not a JSON object"),
            (br#"{"event":"E","channel":"c","claims":{}}"#, Some("x"), "no string \"payload\""),
            (br#"{"event":"E","channel":"c","payload":"p"}"#, Some("x"), "no \"claims\" object"),
            (br#"{"event":"E","channel":"c","payload":"p","claims":{}}"#, Some("x"), "no numeric claims.message_delivered_at"),
            (br#"{"event":"E\u0000","channel":"c","payload":"p","claims":{"message_delivered_at":1}}"#, Some("x"), "contains a NUL character"),
            (br#"{"event":"E","channel":"c","payload":"p","claims":{"message_delivered_at":1e300}}"#, Some("x"), "claims.message_delivered_at is not between 1970 and 9999"),
            (br#"{"event":"E","channel":"c","payload":"p","claims":{"message_delivered_at":-1}}"#, Some("x"), "claims.message_delivered_at is not between 1970 and 9999"),
        ];
        for (data, id, reason) in cases {
            let err = parse("s", 7, data, hdrs(id).meta()).expect_err(reason);
            assert_eq!(err.reason, reason);
            assert_eq!(err.stream_seq, 7);
        }
        let nul = "{\"event\":\"E\u{0}\"}";
        assert_eq!(
            parse("s", 1, nul.as_bytes(), hdrs(Some("x")).meta())
                .expect_err("nul")
                .reason,
            "contains a NUL character"
        );
    }

    #[test]
    fn outcome_records_become_failures_or_dead_letters() {
        let outcome = |ids: Option<&str>, value: &str| {
            let mut h = OwnedMeta::default();
            h.insert(headers::MSG_ID, "a-1:failed");
            if let Some(ids) = ids {
                h.insert(headers::MSG_IDS, ids);
            }
            h.insert(headers::OUTCOME, value);
            h
        };
        let mut batch = Batch::default();
        let long = "é".repeat(MAX_REASON);
        batch.push(
            "s",
            1,
            b"no bridge",
            outcome(Some("a-1,a-2"), "failed").meta(),
        );
        batch.push(
            "s",
            2,
            long.as_bytes(),
            outcome(Some("a-3"), "failed").meta(),
        );
        batch.push("s", 3, b"x", outcome(Some("a-4"), "maybe").meta());
        batch.push("s", 4, b"x", outcome(None, "failed").meta());
        batch.push("s", 5, b"x", outcome(Some("a-5,,a-6"), "failed").meta());
        assert_eq!(batch.failures.len(), 2);
        assert_eq!(batch.failures[0].ids, ["a-1", "a-2"]);
        assert_eq!(batch.failures[0].reason, "no bridge");
        assert_eq!(batch.failures[1].reason.len(), MAX_REASON);
        assert!(batch.records.is_empty());
        let reasons: Vec<&str> = batch.dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "unknown Pgws-Outcome \"maybe\"",
                "an outcome record needs Pgws-Msg-Ids without empty ids",
                "an outcome record needs Pgws-Msg-Ids without empty ids",
            ]
        );
        assert_eq!(batch.len(), 5);
    }
}
