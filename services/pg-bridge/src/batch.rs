//! The pure part of NOTIFY handling: checking a request, the requests a worker executes
//! together, and planning their transactions.
//!
//! Kept apart from the I/O so the rules that matter are unit tested on their own:
//! a bad request is refused before it can share (and fail) a transaction with good ones, and
//! a batch is cut into as few transactions as PostgreSQL allows. PostgreSQL folds identical
//! `(channel, payload)` pairs of one transaction into a single notification, so a pair that
//! would repeat inside a transaction starts a new one; a request is kept whole in one
//! transaction unless it repeats a pair itself. When the bridge writes the audit itself
//! ([`crate::TxAudit`]), each audit record goes with the transaction that NOTIFYs its message
//! ([`audit_plan`]).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgws_bus::Headers;
use pgws_proto::{Notification, NotifyRequest, MAX_NOTIFY_PAYLOAD, MAX_PG_CHANNEL};
use pgws_service::telemetry::{self, TARGET as TRACE};
use tokio::sync::oneshot;

/// The reason sent back when nothing can execute a request now.
pub(crate) const UNAVAILABLE: &str = "database unavailable";
/// The reason sent back for a request received or about to start past its deadline.
pub(crate) const EXPIRED: &str = "request expired before it could be executed";

/// One valid request waiting for its transaction(s).
#[derive(Debug)]
pub(crate) struct Request {
    /// Executed at most once when present ([`crate::dedup`]).
    pub(crate) id: Option<String>,
    /// Not started past this instant (the gateway has given up on it by then).
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) notifications: Vec<Notification>,
    /// The audit records of the request's messages (written only with a [`crate::TxAudit`]).
    pub(crate) records: Vec<Notification>,
    /// Where the answer goes, when the sender asked for one.
    pub(crate) reply: Option<String>,
    /// `bridge.batch`, child of the gateway's publish span (a disabled span when traces are
    /// not exported); it ends when the request has been answered.
    pub(crate) span: tracing::Span,
}

impl Request {
    /// Whether the sender has given up on the request.
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// The span of a request received with `headers`.
    pub(crate) fn span(notifications: usize, headers: &Headers) -> tracing::Span {
        let span = tracing::info_span!(
            target: TRACE,
            "bridge.batch",
            otel.kind = "consumer",
            messaging.system = "nats",
            notifications,
            batch.requests = tracing::field::Empty,
            batch.notifications = tracing::field::Empty,
            batch.transactions = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::adopt(&span, headers);
        span
    }
}

/// The requests one worker executes together.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) requests: Vec<Request>,
    pub(crate) notifications: usize,
}

impl Batch {
    pub(crate) fn push(&mut self, request: Request) {
        self.notifications += request.notifications.len();
        self.requests.push(request);
    }
}

/// A free worker: sending it a batch hands the batch over.
pub(crate) type Offer = oneshot::Sender<Batch>;

/// Why a NOTIFY request was refused; the text is sent back in the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidRequest {
    /// The body is not a `NotifyRequest`.
    #[error("invalid notify request: {0}")]
    Json(String),
    /// `pg_notify` refuses an empty channel.
    #[error("notification {index}: empty channel")]
    EmptyChannel { index: usize },
    /// Longer than a PostgreSQL identifier.
    #[error("notification {index}: channel is {len} bytes, at most {MAX_PG_CHANNEL} allowed")]
    LongChannel { index: usize, len: usize },
    /// PostgreSQL refuses payloads of 8000 bytes or more.
    #[error("notification {index}: payload is {len} bytes, at most {MAX_NOTIFY_PAYLOAD} allowed")]
    LongPayload { index: usize, len: usize },
    /// PostgreSQL text cannot hold NUL.
    #[error("notification {index}: NUL character in {field}")]
    Nul { index: usize, field: &'static str },
    /// An id that cannot be a dedup key.
    #[error("request id must be 1 to {} bytes without NUL", crate::dedup::MAX_ID)]
    Id,
    /// An audit record that no notification of the request NOTIFYs (it would never be
    /// written).
    #[error("record {index}: no notification of the request has its id")]
    RecordId { index: usize },
    /// PostgreSQL text cannot hold NUL.
    #[error("record {index}: NUL character in {field}")]
    RecordNul { index: usize, field: &'static str },
}

/// The instant of a request's `deadline_ms`.
pub(crate) fn deadline(ms: Option<u64>) -> Option<SystemTime> {
    ms.and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
}

/// Parses and checks a request body.
pub(crate) fn validate(body: &[u8]) -> Result<NotifyRequest, InvalidRequest> {
    let mut request: NotifyRequest =
        serde_json::from_slice(body).map_err(|e| InvalidRequest::Json(e.to_string()))?;
    if request.record_notifications {
        // Checked below as records, like those sent as such.
        let own = request.notifications.iter().filter(|n| n.id.is_some());
        request.records.extend(own.cloned());
        request.record_notifications = false;
    }
    if let Some(id) = &request.id {
        if id.is_empty() || id.len() > crate::dedup::MAX_ID || id.contains('\0') {
            return Err(InvalidRequest::Id);
        }
    }
    for (index, n) in request.notifications.iter().enumerate() {
        if n.channel.is_empty() {
            return Err(InvalidRequest::EmptyChannel { index });
        }
        if n.channel.len() > MAX_PG_CHANNEL {
            let len = n.channel.len();
            return Err(InvalidRequest::LongChannel { index, len });
        }
        if n.payload.len() > MAX_NOTIFY_PAYLOAD {
            let len = n.payload.len();
            return Err(InvalidRequest::LongPayload { index, len });
        }
        if n.channel.contains('\0') {
            let field = "channel";
            return Err(InvalidRequest::Nul { index, field });
        }
        if n.payload.contains('\0') {
            let field = "payload";
            return Err(InvalidRequest::Nul { index, field });
        }
    }
    if !request.records.is_empty() {
        let ids: HashSet<&str> = request
            .notifications
            .iter()
            .filter_map(|n| n.id.as_deref())
            .collect();
        for (index, r) in request.records.iter().enumerate() {
            let Some(id) = r.id.as_deref().filter(|id| ids.contains(id)) else {
                return Err(InvalidRequest::RecordId { index });
            };
            let nul = [("id", id), ("channel", &r.channel), ("payload", &r.payload)]
                .into_iter()
                .find(|(_, text)| text.contains('\0'));
            if let Some((field, _)) = nul {
                return Err(InvalidRequest::RecordNul { index, field });
            }
        }
    }
    Ok(request)
}

/// One transaction: `(request, notification)` indexes in execution order.
pub(crate) type Transaction = Vec<(usize, usize)>;

/// Cuts the notifications of `requests` (in order) into transactions without a repeated
/// `(channel, payload)` pair, keeping each request in one transaction when it has no repeated
/// pair itself. Requests without notifications appear in no transaction.
pub(crate) fn plan<'a, I>(requests: I) -> Vec<Transaction>
where
    I: IntoIterator<Item = &'a [Notification]>,
{
    let mut transactions = Vec::new();
    let mut current = Transaction::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for (r, notifications) in requests.into_iter().enumerate() {
        let clashes = notifications
            .iter()
            .any(|n| seen.contains(&(n.channel.as_str(), n.payload.as_str())));
        if clashes {
            transactions.push(std::mem::take(&mut current));
            seen.clear();
        }
        for (i, n) in notifications.iter().enumerate() {
            if !seen.insert((n.channel.as_str(), n.payload.as_str())) {
                // The request repeats a pair itself: it cannot stay in one transaction.
                transactions.push(std::mem::take(&mut current));
                seen.clear();
                seen.insert((n.channel.as_str(), n.payload.as_str()));
            }
            current.push((r, i));
        }
    }
    if !current.is_empty() {
        transactions.push(current);
    }
    transactions
}

/// The audit records each transaction of `plan` writes: `(request, record)` indexes, for each
/// of `requests` (its notifications and its records, in the order `plan` was made from). A
/// record goes with the first transaction that NOTIFYs a notification of its request with the
/// record's id, so it commits exactly when its message's NOTIFY does; a record whose id no
/// notification of its request has goes nowhere ([`validate`] refuses such requests).
pub(crate) fn audit_plan(
    requests: &[(&[Notification], &[Notification])],
    plan: &[Transaction],
) -> Vec<Vec<(usize, usize)>> {
    // (request, id) -> its records not yet given a transaction.
    let mut waiting: HashMap<(usize, &str), Vec<usize>> = HashMap::new();
    for (r, (_, records)) in requests.iter().enumerate() {
        for (j, record) in records.iter().enumerate() {
            if let Some(id) = record.id.as_deref() {
                waiting.entry((r, id)).or_default().push(j);
            }
        }
    }
    plan.iter()
        .map(|tx| {
            let mut written = Vec::new();
            if waiting.is_empty() {
                return written;
            }
            for &(r, i) in tx {
                let Some(id) = requests[r].0[i].id.as_deref() else {
                    continue;
                };
                if let Some(records) = waiting.remove(&(r, id)) {
                    written.extend(records.into_iter().map(|j| (r, j)));
                }
            }
            written
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(channel: &str, payload: &str) -> Notification {
        Notification {
            id: None,
            channel: channel.to_owned(),
            payload: payload.to_owned(),
        }
    }

    fn plan_of(requests: &[Vec<Notification>]) -> Vec<Transaction> {
        plan(requests.iter().map(Vec::as_slice))
    }

    #[test]
    fn distinct_pairs_share_one_transaction() {
        let reqs = vec![
            vec![n("c", "1"), n("c", "2")],
            vec![n("c", "3")],
            vec![n("d", "1")],
        ];
        assert_eq!(plan_of(&reqs), vec![vec![(0, 0), (0, 1), (1, 0), (2, 0)]]);
    }

    #[test]
    fn a_repeated_pair_across_requests_starts_a_new_transaction_before_the_request() {
        let reqs = vec![
            vec![n("c", "a"), n("c", "b")],
            vec![n("c", "x"), n("c", "a")],
            vec![n("c", "y")],
        ];
        assert_eq!(
            plan_of(&reqs),
            vec![vec![(0, 0), (0, 1)], vec![(1, 0), (1, 1), (2, 0)]]
        );
    }

    #[test]
    fn a_request_repeating_a_pair_is_split_where_it_repeats() {
        let reqs = vec![
            vec![n("c", "0")],
            vec![n("c", "a"), n("c", "b"), n("c", "a"), n("c", "a")],
            vec![n("c", "z")],
        ];
        assert_eq!(
            plan_of(&reqs),
            vec![
                vec![(0, 0), (1, 0), (1, 1)],
                vec![(1, 2)],
                vec![(1, 3), (2, 0)],
            ]
        );
    }

    #[test]
    fn same_payload_on_another_channel_is_not_a_repeat() {
        let reqs = vec![vec![n("c", "a")], vec![n("d", "a")]];
        assert_eq!(plan_of(&reqs).len(), 1);
    }

    #[test]
    fn order_is_kept_and_nothing_is_lost() {
        let reqs: Vec<Vec<Notification>> = (0..50)
            .map(|r| {
                (0..(r % 4))
                    .map(|i| n("c", &format!("{}", (r * i) % 7)))
                    .collect()
            })
            .collect();
        let flat: Vec<(usize, usize)> = plan_of(&reqs).into_iter().flatten().collect();
        let expected: Vec<(usize, usize)> = reqs
            .iter()
            .enumerate()
            .flat_map(|(r, ns)| (0..ns.len()).map(move |i| (r, i)))
            .collect();
        assert_eq!(flat, expected);
        for tx in plan_of(&reqs) {
            let mut pairs = HashSet::new();
            for (r, i) in tx {
                let n = &reqs[r][i];
                assert!(
                    pairs.insert((&n.channel, &n.payload)),
                    "repeat inside a transaction"
                );
            }
        }
    }

    #[test]
    fn a_message_and_its_audit_copy_share_a_transaction() {
        // Each message followed by its copy on the audit channel, as a gateway sends them with
        // PGWS_AUDIT_CHANNEL; repeats within and across requests, from sockets on two channels.
        let pair = |c: &str, p: &str| vec![n(c, p), n("audit", p)];
        let reqs = vec![
            [pair("a", "x"), pair("a", "y"), pair("a", "x")].concat(),
            [pair("b", "x"), pair("a", "y")].concat(),
            [pair("a", "x"), pair("a", "x")].concat(),
        ];
        for tx in plan_of(&reqs) {
            for w in tx.chunks(2) {
                let (first, second) = (&reqs[w[0].0][w[0].1], &reqs[w[1].0][w[1].1]);
                assert_ne!(
                    first.channel, "audit",
                    "a copy starts a transaction: {tx:?}"
                );
                assert_eq!(second.channel, "audit");
                assert_eq!(first.payload, second.payload);
            }
        }
    }

    #[test]
    fn empty_requests_take_no_transaction() {
        assert!(plan_of(&[vec![], vec![]]).is_empty());
    }

    fn with_id(id: &str, channel: &str, payload: &str) -> Notification {
        Notification {
            id: Some(id.to_owned()),
            ..n(channel, payload)
        }
    }

    #[test]
    fn a_record_goes_with_the_first_transaction_notifying_its_message() {
        // Request 0 repeats a pair (two transactions), with an untracked copy of "m1" on the
        // audit channel; request 1 shares the second transaction; request 2 has no records.
        let notes = [
            vec![
                with_id("m1", "c", "a"),
                n("audit", "a"),
                with_id("m2", "c", "a"),
            ],
            vec![with_id("m3", "d", "x")],
            vec![with_id("m4", "d", "y")],
        ];
        let records = [
            vec![
                with_id("m2", "c", "env2"),
                with_id("m1", "c", "env1"),
                with_id("m1", "c", "env1 again"),
            ],
            vec![with_id("m3", "d", "env3")],
            vec![],
        ];
        let requests: Vec<(&[Notification], &[Notification])> = notes
            .iter()
            .zip(&records)
            .map(|(n, r)| (n.as_slice(), r.as_slice()))
            .collect();
        let txs = plan(notes.iter().map(Vec::as_slice));
        assert_eq!(
            txs,
            vec![vec![(0, 0), (0, 1)], vec![(0, 2), (1, 0), (2, 0)]]
        );
        assert_eq!(
            audit_plan(&requests, &txs),
            vec![vec![(0, 1), (0, 2)], vec![(0, 0), (1, 0)]]
        );
        // An id NOTIFYed twice (in two transactions) still writes its record once.
        let twice = [with_id("m", "c", "a"), with_id("m", "c", "a")];
        let record = [with_id("m", "c", "env")];
        let txs = plan(std::iter::once(twice.as_slice()));
        assert_eq!(txs.len(), 2);
        assert_eq!(
            audit_plan(&[(&twice, &record)], &txs),
            vec![vec![(0, 0)], vec![]]
        );
        // Another request's notification with the same id does not take the record.
        let other = [with_id("m", "c", "b")];
        let none: [Notification; 0] = [];
        let txs = vec![vec![(1, 0)], vec![(0, 0)]];
        assert_eq!(
            audit_plan(&[(&twice[..1], &record), (&other, &none)], &txs),
            vec![vec![], vec![(0, 0)]]
        );
    }

    #[test]
    fn notifications_are_their_own_records_when_the_request_says_so() {
        let mut r = NotifyRequest::new(vec![with_id("m1", "c", "a"), n("audit", "a")]);
        let plain = serde_json::to_string(&r).expect("encodes");
        assert!(!plain.contains("record_notifications"), "{plain}");
        assert!(validate(plain.as_bytes())
            .expect("valid")
            .records
            .is_empty());
        r.record_notifications = true;
        let ok = validate(&serde_json::to_vec(&r).expect("encodes")).expect("valid");
        assert_eq!(ok.records, vec![with_id("m1", "c", "a")]);
        // Checked as records are: an id PostgreSQL text cannot hold is refused.
        r.notifications[0].id = Some("m\u{0}".to_owned());
        assert_eq!(
            validate(&serde_json::to_vec(&r).expect("encodes")),
            Err(InvalidRequest::RecordNul {
                index: 0,
                field: "id"
            })
        );
    }

    #[test]
    fn records_must_belong_to_a_notification_of_the_request() {
        let request = |records: Vec<Notification>| {
            let mut r = NotifyRequest::new(vec![with_id("m1", "c", "a"), n("audit", "a")]);
            r.records = records;
            serde_json::to_vec(&r).expect("encodes")
        };
        let ok = validate(&request(vec![with_id("m1", "c", "env")])).expect("valid");
        assert_eq!(ok.records, vec![with_id("m1", "c", "env")]);
        assert_eq!(
            validate(&request(vec![
                with_id("m1", "c", "e"),
                with_id("m9", "c", "e")
            ])),
            Err(InvalidRequest::RecordId { index: 1 })
        );
        assert_eq!(
            validate(&request(vec![n("c", "e")])),
            Err(InvalidRequest::RecordId { index: 0 })
        );
        let err = validate(&request(vec![with_id("m1", "c", "e\0")])).expect_err("NUL");
        assert_eq!(err.to_string(), "record 0: NUL character in payload");
    }

    #[test]
    fn valid_requests_pass() {
        let body = br#"{"notifications":[{"channel":"c","payload":"{\"x\":1}"}]}"#;
        let req = validate(body).expect("valid");
        assert_eq!(req.notifications, vec![n("c", "{\"x\":1}")]);
        let max = format!(
            r#"{{"notifications":[{{"channel":"{}","payload":"{}"}}]}}"#,
            "c".repeat(MAX_PG_CHANNEL),
            "p".repeat(MAX_NOTIFY_PAYLOAD)
        );
        assert!(validate(max.as_bytes()).is_ok());
        assert!(validate(br#"{"notifications":[]}"#).is_ok());
    }

    #[test]
    fn invalid_requests_are_refused_with_a_reason() {
        let body = |channel: &str, payload: &str| {
            serde_json::to_vec(&NotifyRequest::new(vec![
                n("ok", "ok"),
                n(channel, payload),
            ]))
            .expect("encodes")
        };
        assert!(matches!(validate(b"nope"), Err(InvalidRequest::Json(_))));
        assert!(matches!(validate(b"{}"), Err(InvalidRequest::Json(_))));
        assert_eq!(
            validate(&body("", "x")),
            Err(InvalidRequest::EmptyChannel { index: 1 })
        );
        assert_eq!(
            validate(&body(&"c".repeat(64), "x")),
            Err(InvalidRequest::LongChannel { index: 1, len: 64 })
        );
        assert_eq!(
            validate(&body("c", &"é".repeat(4000))),
            Err(InvalidRequest::LongPayload {
                index: 1,
                len: 8000
            })
        );
        let err = validate(&body("c", "a\0b")).expect_err("NUL");
        assert_eq!(err.to_string(), "notification 1: NUL character in payload");
        assert!(validate(&body("c\0", "x")).is_err());
    }
}
