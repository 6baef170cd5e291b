//! The recorder's audit record parser (`Batch::push` through `pg_recorder::fuzzing`): any
//! body with any `Nats-Msg-Id`, `Pgws-Msg-Ids`, `Pgws-Notify-Channel` and `Pgws-Outcome`
//! headers. Nothing panics; an outcome record becomes one failure report (ids without NUL, a
//! reason of at most 1024 bytes) or one dead letter; every envelope becomes a row or a dead
//! letter, in order; a row is one PostgreSQL takes (no NUL in text, claims that `jsonb`
//! accepts, a time between 1970 and 9999); a dead letter too; and the fast parse, when it
//! answers, agrees with the checked one.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pg_recorder::fuzzing::{parse_both, push, Row};
use pgws_fuzz::jsonb_accepts;
use pgws_proto::{headers, Envelope, EnvelopeClaims};
use serde_json::Value;

/// The first second a row's time may not reach (10000-01-01).
const LATEST: f64 = 253_402_300_800.0;

#[derive(Debug)]
struct Input {
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Text that JSON parsers and PostgreSQL disagree about, spliced into envelopes.
const FRAGMENTS: &[&str] = &[
    r"\u0000",
    r"\ud800",
    r"\udc00",
    r"\ud83d\ude00",
    r"\ud83d",
    "1e400",
    r#"",""#,
    r#""message_delivered_at":1,"#,
    "\0",
];

/// An envelope as a gateway writes it, or close to it: fuzzed parts, and now and then a
/// fuzzed string or a troublesome fragment spliced in.
fn envelope(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut claims = pgws_fuzz::claims(u)?;
    let at: f64 = if u.arbitrary()? {
        1.7e9 + f64::from(u.arbitrary::<u16>()?)
    } else {
        u.arbitrary()?
    };
    if u.ratio(1, 8)? {
        claims.insert("message_delivered_at".to_owned(), pgws_fuzz::value(u, 1)?);
    }
    // A string claim whose escape (`\u0001`) is swapped for a fragment below: escapes
    // inside strings, where JSON parsers and PostgreSQL look at them.
    let swap = u.ratio(1, 4)?;
    if swap {
        claims.insert(pgws_fuzz::key(u)?, serde_json::Value::from("a\u{1}b"));
    }
    let event: String = u.arbitrary()?;
    let channel = pgws_fuzz::channel(u)?;
    let payload: String = u.arbitrary()?;
    let mut json = Envelope::new(
        &event,
        &channel,
        &payload,
        &EnvelopeClaims::new(&claims),
        at,
    )
    .to_json();
    if swap {
        json = json.replace("\\u0001", u.choose(FRAGMENTS)?);
    }
    if u.ratio(1, 4)? {
        let at = u.choose_index(json.len() + 1)?;
        let splice = if u.arbitrary()? {
            (*u.choose(FRAGMENTS)?).to_owned()
        } else {
            u.arbitrary::<String>()?
        };
        if json.is_char_boundary(at) {
            json.insert_str(at, &splice);
        }
    }
    Ok(json.into_bytes())
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let parts = u.int_in_range(1..=3)?;
        let mut bodies = Vec::new();
        for _ in 0..parts {
            bodies.push(if u.arbitrary()? {
                envelope(u)?
            } else {
                u.arbitrary()?
            });
        }
        let mut hdrs = Vec::new();
        if u.ratio(7, 8)? {
            hdrs.push((headers::MSG_ID.to_owned(), u.arbitrary()?));
        }
        if parts > 1 || u.ratio(1, 8)? {
            let ids: Vec<String> = (0..parts).map(|i| format!("id-{i}")).collect();
            let ids = if u.ratio(7, 8)? {
                ids.join(",")
            } else {
                u.arbitrary()?
            };
            hdrs.push((headers::MSG_IDS.to_owned(), ids));
        }
        if u.ratio(7, 8)? {
            hdrs.push((headers::NOTIFY_CHANNEL.to_owned(), u.arbitrary()?));
        }
        // Now and then an outcome record (NOTIFY failures reported by a gateway).
        if u.ratio(1, 8)? {
            let outcome = if u.arbitrary()? {
                headers::OUTCOME_FAILED.to_owned()
            } else {
                u.arbitrary()?
            };
            hdrs.push((headers::OUTCOME.to_owned(), outcome));
        }
        // Other headers, named apart from the contract's (their names are case-insensitive).
        let others = u.arbitrary::<Vec<(String, String)>>()?;
        hdrs.extend(others.into_iter().map(|(n, v)| (format!("X-{n}"), v)));
        // What NATS carries: no line break in a value, names of visible ASCII without ':'.
        hdrs.retain(|(n, _)| n.chars().all(|c| c.is_ascii_graphic() && c != ':'));
        for (_, value) in &mut hdrs {
            value.retain(|c| c != '\r' && c != '\n');
        }
        Ok(Input {
            body: bodies.join(&b'\n'),
            headers: hdrs,
        })
    }
}

fn row_ok(row: &Row) {
    for text in [
        &row.id,
        &row.channel,
        &row.event,
        &row.payload,
        &row.notify_channel,
        &row.envelope,
    ] {
        assert!(!text.contains('\0'), "{row:?}");
    }
    assert!(!row.id.is_empty());
    assert!((0.0..LATEST).contains(&row.received_at), "{row:?}");
    assert!(row.claims.starts_with('{'), "{row:?}");
    assert!(
        jsonb_accepts(&row.claims),
        "claims jsonb refuses: {}",
        row.claims
    );
}

fuzz_target!(|input: Input| {
    let hdrs: Vec<(&str, &str)> = input
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let pushed = push(&input.body, &hdrs);
    let first = |name: &str| hdrs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    if first(headers::OUTCOME).is_some() {
        // One failure report or one dead letter, and no row.
        assert!(pushed.rows.is_empty());
        assert_eq!(pushed.failures.len() + pushed.dead.len(), 1);
        for failure in &pushed.failures {
            assert!(!failure.ids.is_empty());
            assert!(failure
                .ids
                .iter()
                .all(|id| !id.is_empty() && !id.contains('\0')));
            assert!(!failure.reason.contains('\0') && failure.reason.len() <= 1024);
        }
        return;
    }
    assert!(pushed.failures.is_empty());
    let parts: Vec<&[u8]> = match first(headers::MSG_IDS) {
        None => vec![input.body.as_slice()],
        Some(ids) => {
            let parts: Vec<&[u8]> = input.body.split(|b| *b == b'\n').collect();
            let ids: Vec<&str> = ids.split(',').collect();
            if ids.len() == parts.len() && ids.iter().all(|id| !id.is_empty()) {
                parts
            } else {
                assert!(pushed.rows.is_empty());
                assert_eq!(pushed.dead.len(), 1);
                vec![]
            }
        }
    };
    if !parts.is_empty() {
        assert_eq!(pushed.rows.len() + pushed.dead.len(), parts.len());
        let mut seen: Vec<i32> = pushed.rows.iter().map(|r| r.part).collect();
        seen.extend(pushed.dead.iter().map(|d| d.part));
        seen.sort_unstable();
        let expected: Vec<i32> = (0..parts.len()).map(|p| p as i32).collect();
        assert_eq!(seen, expected);
    }
    for row in &pushed.rows {
        row_ok(row);
        let part = parts[row.part as usize];
        assert_eq!(row.envelope.as_bytes(), part);
    }
    for dead in &pushed.dead {
        for text in [&dead.reason, &dead.data, &dead.headers] {
            assert!(!text.contains('\0'), "{dead:?}");
        }
        assert!(!dead.msg_id.as_deref().unwrap_or("").contains('\0'));
        assert!(
            jsonb_accepts(&dead.headers),
            "headers jsonb refuses: {}",
            dead.headers
        );
    }

    let (fast, checked) = parse_both(&input.body, &hdrs);
    if let Ok(row) = &checked {
        row_ok(row);
    }
    if let Some(fast) = fast {
        row_ok(&fast);
        if let Ok(checked) = checked {
            let json = |s: &str| serde_json::from_str::<Value>(s).expect("claims are JSON");
            assert_eq!(json(&fast.claims), json(&checked.claims));
            assert_eq!(
                Row {
                    claims: String::new(),
                    ..fast
                },
                Row {
                    claims: String::new(),
                    ..checked
                }
            );
        }
    }
});
