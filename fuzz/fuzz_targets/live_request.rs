//! `/live` client frames (`ws_gateway::fuzzing::live_frame`): any text, or requests as Daptin's
//! clients write them with fuzzed ids, methods and attributes. Nothing panics; every frame is
//! answered with a JSON reply that echoes the request's id as sent (an id over
//! `LIVE_MAX_ID` bytes of JSON is refused and not echoed); topic names taken from a
//! request are 1 to 63 bytes without a comma, a control character (NUL included: they are
//! PostgreSQL text) or surrounding spaces, and one request names at most 64.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pgws_proto::{valid_live_topic, MAX_LIVE_TOPIC};
use serde_json::{json, Map, Value};
use ws_gateway::fuzzing::{live_frame, LIVE_MAX_ID};

const METHODS: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "new-message",
    "create-topic",
    "create-topicName",
    "destroy-topic",
    "destroy-topicName",
    "list-topic",
    "get-topic",
    "ping",
];

#[derive(Debug)]
struct Input {
    frame: String,
}

/// A topic list: names usually short, with spaces, commas and the odd control character.
fn topic_list(u: &mut Unstructured<'_>) -> Result<String> {
    let n = u.int_in_range(0..=70)?;
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        names.push(match u.int_in_range(0..=4)? {
            0 => " news ".to_owned(),
            1 => "a".repeat(u.int_in_range(60..=66)?),
            _ => u.arbitrary()?,
        });
    }
    Ok(names.join(","))
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        if u.ratio(1, 4)? {
            return Ok(Input {
                frame: u.arbitrary()?,
            });
        }
        let mut request = Map::new();
        if u.arbitrary()? {
            request.insert("id".to_owned(), pgws_fuzz::value(u, 2)?);
        }
        let method = if u.ratio(7, 8)? {
            Value::from(*u.choose(METHODS)?)
        } else {
            pgws_fuzz::value(u, 1)?
        };
        request.insert("method".to_owned(), method);
        let mut attributes = pgws_fuzz::object(u, 1)?;
        for key in ["topicName", "name"] {
            if u.arbitrary()? {
                attributes.insert(key.to_owned(), Value::from(topic_list(u)?));
            }
        }
        if u.arbitrary()? {
            attributes.insert("public".to_owned(), pgws_fuzz::value(u, 0)?);
        }
        request.insert("attributes".to_owned(), Value::Object(attributes));
        Ok(Input {
            frame: Value::Object(request).to_string(),
        })
    }
}

fn topic_ok(name: &str) {
    assert!(valid_live_topic(name), "{name:?}");
    assert!((1..=MAX_LIVE_TOPIC).contains(&name.len()), "{name:?}");
    assert!(!name.contains('\0') && !name.contains(','), "{name:?}");
}

fuzz_target!(|input: Input| {
    // The id as sent, when the frame is an object that has one (and echoed only when it is
    // not too long).
    let sent_id = serde_json::from_str::<Value>(&input.frame)
        .ok()
        .and_then(|v| v.get("id").cloned());
    let long_id = sent_id
        .as_ref()
        .is_some_and(|id| id.to_string().len() > LIVE_MAX_ID);
    let reply = |text: &str| -> Map<String, Value> {
        match serde_json::from_str(text) {
            Ok(Value::Object(reply)) => reply,
            other => panic!("reply {text} is not a JSON object: {other:?}"),
        }
    };
    match live_frame(&input.frame) {
        Err(refusal) => {
            let refusal = reply(&refusal);
            assert_eq!(refusal.get("type"), Some(&json!("response")));
            assert_eq!(refusal.get("ok"), Some(&json!(false)));
            let echoed = sent_id.as_ref().filter(|_| !long_id);
            assert_eq!(refusal.get("id"), echoed);
            match refusal.get("method") {
                Some(Value::Null) => {}
                Some(Value::String(m)) => assert!(m.len() <= input.frame.len()),
                other => panic!("method {other:?}"),
            }
        }
        Ok(request) => {
            assert!(!long_id, "a long id was accepted");
            assert!(METHODS.contains(&request.name.as_str()));
            for text in [&request.ok_reply, &request.error_reply] {
                let answer = reply(text);
                assert_eq!(answer.get("id"), sent_id.as_ref());
                assert_eq!(answer.get("method"), Some(&json!(request.name)));
            }
            if let Ok(topics) = &request.topics {
                assert!((1..=64).contains(&topics.len()), "{} topics", topics.len());
                topics.iter().for_each(|t| topic_ok(t));
            }
            if let Ok(topic) = &request.topic {
                topic_ok(topic);
            }
        }
    }
});
