//! The postgres-websockets envelope (`pgws_proto::Envelope`): what is built is JSON without a
//! repeated member, holds exactly the parts it was built from with `message_delivered_at`
//! set by the gateway (whatever the token's claims say), and routes back to its channel;
//! routing any notification payload never panics and agrees with a plain JSON reading.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pgws_fuzz::{claims, parse_unique};
use pgws_proto::{Envelope, EnvelopeClaims};
use serde_json::{Map, Number, Value};

#[derive(Debug)]
struct Input {
    event: String,
    channel: String,
    payload: String,
    claims: Map<String, Value>,
    at: f64,
    /// A notification payload from PostgreSQL.
    notified: String,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Input {
            event: u.arbitrary()?,
            channel: pgws_fuzz::channel(u)?,
            payload: u.arbitrary()?,
            claims: claims(u)?,
            at: u.arbitrary()?,
            notified: u.arbitrary()?,
        })
    }
}

fuzz_target!(|input: Input| {
    let Input {
        event,
        channel,
        payload,
        claims,
        at,
        notified,
    } = input;
    let json = Envelope::new(
        &event,
        &channel,
        &payload,
        &EnvelopeClaims::new(&claims),
        at,
    )
    .to_json();
    let parsed = match parse_unique(&json) {
        Ok(Value::Object(parsed)) => parsed,
        other => panic!("envelope {json} is not a JSON object without repeats: {other:?}"),
    };
    assert_eq!(parsed.get("event"), Some(&Value::from(event)));
    assert_eq!(parsed.get("channel"), Some(&Value::from(channel.clone())));
    assert_eq!(parsed.get("payload"), Some(&Value::from(payload)));
    let mut expected = claims;
    let time = Number::from_f64(at).map_or(Value::Null, Value::Number);
    expected.insert("message_delivered_at".to_owned(), time);
    assert_eq!(
        parsed.get("claims"),
        Some(&Value::Object(expected)),
        "{json}"
    );
    assert_eq!(parsed.len(), 4);
    assert_eq!(Envelope::route(&json), Ok(channel));

    if let Ok(routed) = Envelope::route(&notified) {
        let value: Value = serde_json::from_str(&notified).expect("routed payloads are JSON");
        assert_eq!(value.get("channel"), Some(&Value::from(routed)));
    }
});
