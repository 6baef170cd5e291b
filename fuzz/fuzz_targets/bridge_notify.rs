//! The bridge's NOTIFY request check (`validate`, through `pg_bridge::fuzzing`) and the
//! transactions it cuts a batch into (`plan`): any bodies, as JSON from a gateway or any
//! bytes. Nothing panics; an accepted request holds only notifications PostgreSQL takes
//! (channel 1 to 63 bytes, payload at most 7999 bytes, no NUL) and an id (its dedup key) that
//! is not empty and has no NUL, and reads back the same from its own JSON; a refusal that
//! names a notification names the first bad one; the plan keeps every notification once, in
//! order, never repeats a (channel, payload) pair in a transaction, and keeps a request
//! without a repeat of its own in one transaction.

#![no_main]

use std::collections::HashSet;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pg_bridge::fuzzing::{plan_transactions, validate_notify};
use pgws_proto::{valid_channel, Notification, NotifyRequest, MAX_NOTIFY_PAYLOAD};

#[derive(Debug)]
struct Input {
    bodies: Vec<Vec<u8>>,
}

/// A request body as a gateway writes it, with fuzzed notifications (few distinct values,
/// so that repeats are common).
fn body(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=6)?;
    let mut notifications = Vec::new();
    for _ in 0..n {
        let channel = if u.arbitrary()? {
            (*u.choose(&["a", "b"])?).to_owned()
        } else {
            pgws_fuzz::channel(u)?
        };
        let payload = match u.int_in_range(0..=3)? {
            0 => "p".repeat(u.int_in_range(7990..=8010)?),
            1 => u.arbitrary()?,
            _ => (*u.choose(&["x", "y", ""])?).to_owned(),
        };
        let mut n = serde_json::json!({"channel": channel, "payload": payload});
        if u.arbitrary()? {
            n["id"] = serde_json::Value::from(u.arbitrary::<String>()?);
        }
        notifications.push(n);
    }
    let mut request = serde_json::json!({ "notifications": notifications });
    if u.arbitrary()? {
        request["id"] = serde_json::Value::from(u.arbitrary::<String>()?);
    }
    if u.arbitrary()? {
        request["deadline_ms"] = pgws_fuzz::number(u)?;
    }
    if u.ratio(1, 4)? {
        request[u.arbitrary::<String>()?] = pgws_fuzz::value(u, 1)?;
    }
    Ok(request.to_string().into_bytes())
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let n = u.int_in_range(1..=4)?;
        let mut bodies = Vec::new();
        for _ in 0..n {
            bodies.push(if u.ratio(3, 4)? {
                body(u)?
            } else {
                u.arbitrary()?
            });
        }
        Ok(Input { bodies })
    }
}

fn takes(n: &Notification) -> bool {
    valid_channel(&n.channel) && n.payload.len() <= MAX_NOTIFY_PAYLOAD && !n.payload.contains('\0')
}

fuzz_target!(|input: Input| {
    let mut accepted: Vec<NotifyRequest> = Vec::new();
    for body in &input.bodies {
        match validate_notify(body) {
            Ok(request) => {
                assert!(request.notifications.iter().all(takes), "{request:?}");
                if let Some(id) = &request.id {
                    assert!(!id.is_empty() && !id.contains('\0'), "{id:?}");
                }
                let again = serde_json::to_vec(&request).expect("encodes");
                assert_eq!(validate_notify(&again).as_ref(), Ok(&request));
                accepted.push(request);
            }
            Err(why) => {
                let Some(index) = why
                    .strip_prefix("notification ")
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|i| i.parse::<usize>().ok())
                else {
                    continue;
                };
                let request: NotifyRequest =
                    serde_json::from_slice(body).expect("a refused notification was read");
                assert!(!takes(&request.notifications[index]), "{why}");
                assert!(request.notifications[..index].iter().all(takes), "{why}");
            }
        }
    }

    let requests: Vec<&[Notification]> = accepted
        .iter()
        .map(|r| r.notifications.as_slice())
        .collect();
    let plan = plan_transactions(&requests);
    let flat: Vec<(usize, usize)> = plan.iter().flatten().copied().collect();
    let expected: Vec<(usize, usize)> = requests
        .iter()
        .enumerate()
        .flat_map(|(r, ns)| (0..ns.len()).map(move |i| (r, i)))
        .collect();
    assert_eq!(flat, expected);
    for tx in &plan {
        assert!(!tx.is_empty());
        let mut pairs = HashSet::new();
        for &(r, i) in tx {
            let n = &requests[r][i];
            assert!(pairs.insert((&n.channel, &n.payload)), "repeat in {tx:?}");
        }
    }
    for (r, notifications) in requests.iter().enumerate() {
        let pairs: HashSet<_> = notifications
            .iter()
            .map(|n| (&n.channel, &n.payload))
            .collect();
        if pairs.len() == notifications.len() && !notifications.is_empty() {
            let holding = plan.iter().filter(|tx| tx.iter().any(|(q, _)| *q == r));
            assert_eq!(holding.count(), 1, "request {r} split");
        }
    }
});
