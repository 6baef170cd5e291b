//! A worker against the real PostgreSQL: order, repeated payloads, replies, lost connections,
//! audit records written in the NOTIFY transactions.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pgws_bus::Subscription;
use pgws_proto::{Notification, NotifyReply};
use pgws_service::{Metrics, Shutdown};
use tokio::sync::watch;

use super::*;
use crate::batch::Request;
use crate::test_support::{bus, client, db_uri, eventually, listen, take, unique, WAIT};

struct Setup {
    worker: Worker,
    metrics: BridgeMetrics,
    shutdown: Shutdown,
    app: String,
    replies: Subscription,
    inbox: String,
}

async fn setup() -> Setup {
    setup_with(None).await
}

/// A worker writing the audit with `audit`, when given.
async fn setup_with(audit: Option<Arc<dyn TxAudit>>) -> Setup {
    let nats = bus().await;
    let inbox = unique("test.replies.");
    let replies = nats.subscribe(&inbox).await.expect("subscribe");
    let metrics = BridgeMetrics::register(&Metrics::new());
    let shutdown = Shutdown::new();
    let app = unique("worker");
    let mut pg = db::pg_config(&db_uri()).expect("uri");
    pg.application_name(&app);
    let (up, _) = watch::channel(0);
    let mut worker = Worker::new(
        0,
        pg,
        Arc::new(up),
        nats,
        metrics.clone(),
        shutdown.clone(),
        true,
    )
    .with_audit(audit);
    worker.conn = Some(worker.connect().await.expect("worker connects"));
    Setup {
        worker,
        metrics,
        shutdown,
        app,
        replies,
        inbox,
    }
}

fn request(channel: &str, payloads: &[&str], reply: &str) -> Request {
    Request {
        id: None,
        deadline: None,
        notifications: payloads
            .iter()
            .map(|p| Notification {
                id: None,
                channel: channel.to_owned(),
                payload: (*p).to_owned(),
            })
            .collect(),
        records: Vec::new(),
        reply: Some(reply.to_owned()),
        span: tracing::Span::none(),
    }
}

async fn next_reply(replies: &mut Subscription) -> NotifyReply {
    let message = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a reply in time")
        .expect("subscription open");
    serde_json::from_slice(&message.payload).expect("a NotifyReply")
}

#[tokio::test]
async fn a_batch_keeps_order_and_repeated_payloads() {
    let mut s = setup().await;
    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let mut batch = Batch::default();
    batch.push(request(&channel, &["a", "b"], &s.inbox));
    batch.push(request(&channel, &["a"], &s.inbox));
    batch.push(request(&channel, &["c", "c"], &s.inbox));
    s.worker.execute(batch).await;
    for _ in 0..3 {
        assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    }
    assert_eq!(take(&mut notes, 5).await, ["a", "b", "a", "c", "c"]);
    assert_eq!(s.metrics.transactions.get(), 3);
    assert_eq!(s.metrics.requests_ok.get(), 3);

    // A second batch on the same connection: nothing left over from the first.
    let mut batch = Batch::default();
    batch.push(request(&channel, &["a", "a"], &s.inbox));
    s.worker.execute(batch).await;
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    assert_eq!(take(&mut notes, 2).await, ["a", "a"]);
    drop(s.worker);
    s.shutdown.token.cancel();
    assert!(s.shutdown.drain(WAIT).await, "connection tasks end");
}

#[tokio::test]
async fn a_lost_connection_fails_the_batch() {
    let mut s = setup().await;
    let channel = unique("chan");
    let admin = client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&s.app],
        )
        .await
        .expect("terminate");
    let gone = s
        .worker
        .conn
        .as_ref()
        .map(|c| c.gone.clone())
        .expect("conn");
    eventually("the connection to be seen gone", || gone.is_cancelled()).await;
    let mut batch = Batch::default();
    batch.push(request(&channel, &["x"], &s.inbox));
    s.worker.execute(batch).await;
    let reply = next_reply(&mut s.replies).await;
    assert!(!reply.ok);
    assert_eq!(reply.error.as_deref(), Some(crate::batch::UNAVAILABLE));
    assert_eq!(s.metrics.requests_failed.get(), 1);
    assert_eq!(s.metrics.notify_errors.get(), 1);
}

/// A request with an id, as a gateway sends it, due in `due`.
fn with_id(mut request: Request, id: &str, due: Duration) -> Request {
    request.id = Some(id.to_owned());
    request.deadline = Some(SystemTime::now() + due);
    request
}

#[tokio::test]
async fn a_retried_request_is_notified_once_even_through_another_worker() {
    let mut s = setup().await;
    let mut other = setup().await;
    let channel = unique("chan");
    let id = unique("req");
    let (_listener, mut notes) = listen(&channel).await;
    let due = Duration::from_secs(30);
    // Repeats a pair itself, so it takes two transactions: each part is keyed on its own.
    let retried = || with_id(request(&channel, &["a", "b", "a"], &s.inbox), &id, due);
    let mut batch = Batch::default();
    batch.push(retried());
    s.worker.execute(batch).await;
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    // The retry, alone and then behind a new request, on another connection.
    let mut batch = Batch::default();
    batch.push(retried());
    other.worker.execute(batch).await;
    let mut batch = Batch::default();
    batch.push(retried());
    batch.push(with_id(
        request(&channel, &["next"], &s.inbox),
        &unique("req"),
        due,
    ));
    other.worker.execute(batch).await;
    for _ in 0..3 {
        assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    }
    assert_eq!(take(&mut notes, 4).await, ["a", "b", "a", "next"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), notes.recv())
            .await
            .is_err(),
        "a retried request was notified again"
    );
    assert_eq!(other.metrics.duplicates.get(), 6);
    // Without an id, a request is executed each time.
    let mut batch = Batch::default();
    batch.push(request(&channel, &["plain"], &s.inbox));
    batch.push(request(&channel, &["plain"], &s.inbox));
    other.worker.execute(batch).await;
    assert_eq!(take(&mut notes, 2).await, ["plain", "plain"]);
}

#[tokio::test]
async fn an_expired_request_is_answered_failed_and_not_notified() {
    let mut s = setup().await;
    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let mut batch = Batch::default();
    let mut late = with_id(
        request(&channel, &["late"], &s.inbox),
        &unique("req"),
        Duration::ZERO,
    );
    late.deadline = Some(SystemTime::now() - Duration::from_millis(1));
    batch.push(late);
    batch.push(with_id(
        request(&channel, &["on time"], &s.inbox),
        &unique("req"),
        Duration::from_secs(30),
    ));
    s.worker.execute(batch).await;
    let expired = next_reply(&mut s.replies).await;
    assert_eq!(expired.error.as_deref(), Some(crate::batch::EXPIRED));
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    assert_eq!(take(&mut notes, 1).await, ["on time"]);
    assert_eq!(s.metrics.requests_expired.get(), 1);
}

/// Records each message's id, channel and envelope in a table of the test's own.
struct TableAudit {
    sql: String,
    /// Gives a parameter of the wrong type (the statement cannot take it).
    wrong_types: bool,
    /// The binary `COPY` into the table, when it offers one.
    copy: Option<String>,
}

impl TableAudit {
    fn new(table: &str) -> Self {
        Self {
            sql: format!(
                "INSERT INTO {table} (id, channel, envelope)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                 ON CONFLICT (id) DO NOTHING"
            ),
            wrong_types: false,
            copy: None,
        }
    }

    /// The same, with a `COPY` when `copy`.
    fn with_copy(table: &str, copy: bool) -> Self {
        Self {
            copy: copy.then(|| {
                format!("COPY {table} (id, channel, envelope) FROM STDIN (FORMAT binary)")
            }),
            ..Self::new(table)
        }
    }
}

impl TxAudit for TableAudit {
    fn sql(&self) -> &str {
        &self.sql
    }

    fn copy_sql(&self) -> Option<&str> {
        self.copy.as_deref()
    }

    fn copy(&self, records: &[Notification]) -> Option<bytes::Bytes> {
        use bytes::BufMut;
        self.copy.as_ref()?;
        let mut buf = bytes::BytesMut::new();
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i64(0);
        for r in records {
            buf.put_i16(3);
            for field in [r.id.as_deref().unwrap_or_default(), &r.channel, &r.payload] {
                buf.put_i32(field.len() as i32);
                buf.put_slice(field.as_bytes());
            }
        }
        buf.put_i16(-1);
        Some(buf.freeze())
    }

    fn params(&self, records: &[Notification]) -> Vec<Box<dyn ToSql + Sync + Send>> {
        let field = |f: fn(&Notification) -> String| records.iter().map(f).collect::<Vec<_>>();
        let ids = field(|r| r.id.clone().unwrap_or_default());
        let envelopes = field(|r| r.payload.clone());
        if self.wrong_types {
            return vec![Box::new(ids), Box::new(42_i32), Box::new(envelopes)];
        }
        vec![
            Box::new(ids),
            Box::new(field(|r| r.channel.clone())),
            Box::new(envelopes),
        ]
    }
}

/// A table for [`TableAudit`]; an envelope `bad` breaks its check.
async fn audit_table(db: &tokio_postgres::Client) -> String {
    let table = unique("audit");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, channel text NOT NULL,
             envelope text NOT NULL CHECK (envelope <> 'bad'))"
    ))
    .await
    .expect("audit table");
    table
}

/// The table's rows as `id channel envelope`, by id.
async fn audited(db: &tokio_postgres::Client, table: &str) -> Vec<String> {
    db.query(
        &format!("SELECT id || ' ' || channel || ' ' || envelope FROM {table} ORDER BY id"),
        &[],
    )
    .await
    .expect("audit rows")
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// A notification of message `id`.
fn message(id: Option<&str>, channel: &str, payload: &str) -> Notification {
    Notification {
        id: id.map(str::to_owned),
        channel: channel.to_owned(),
        payload: payload.to_owned(),
    }
}

/// A request with an id and its messages' audit records.
fn audited_request(
    id: &str,
    notifications: Vec<Notification>,
    records: Vec<Notification>,
    reply: &str,
) -> Request {
    let mut request = with_id(request("unused", &[], reply), id, Duration::from_secs(30));
    request.notifications = notifications;
    request.records = records;
    request
}

/// Nothing more arrives on `notes` for a moment.
async fn quiet(notes: &mut tokio::sync::mpsc::UnboundedReceiver<String>) {
    let more = tokio::time::timeout(Duration::from_millis(300), notes.recv()).await;
    assert!(more.is_err(), "unexpected notification {more:?}");
}

/// Both ways of writing records: the statement, and the `COPY` (refused for the retry's rows
/// that exist, which the statement then skips).
#[tokio::test]
async fn audit_records_commit_with_their_notifies() {
    for copy in [false, true] {
        audit_records_commit_with_their_notifies_by(copy).await;
    }
}

async fn audit_records_commit_with_their_notifies_by(copy: bool) {
    let db = client().await;
    let table = audit_table(&db).await;
    let mut s = setup_with(Some(Arc::new(TableAudit::with_copy(&table, copy)))).await;
    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let c = channel.as_str();
    // The first request repeats a pair (its copy of m1 without id), so it takes two
    // transactions; m3's request and a request without records share the second.
    let (r1, r2) = (unique("r"), unique("r"));
    let first = || {
        audited_request(
            &r1,
            vec![
                message(Some("m1"), c, "a"),
                message(Some("m2"), c, "b"),
                message(None, c, "a"),
            ],
            vec![
                message(Some("m1"), c, "env1"),
                message(Some("m2"), c, "env2"),
            ],
            &s.inbox,
        )
    };
    let mut batch = Batch::default();
    batch.push(first());
    batch.push(audited_request(
        &r2,
        vec![message(Some("m3"), c, "c")],
        vec![message(Some("m3"), c, "env3")],
        &s.inbox,
    ));
    batch.push(request(c, &["d"], &s.inbox));
    s.worker.execute(batch).await;
    for _ in 0..3 {
        assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    }
    assert_eq!(take(&mut notes, 5).await, ["a", "b", "a", "c", "d"]);
    assert_eq!(s.metrics.transactions.get(), 2);
    let expected = [
        format!("m1 {c} env1"),
        format!("m2 {c} env2"),
        format!("m3 {c} env3"),
    ];
    assert_eq!(audited(&db, &table).await, expected);

    assert_eq!(s.metrics.audit_copy_refused.get(), 0);

    // A retry of the first request: nothing NOTIFYed again, nothing recorded twice.
    let mut batch = Batch::default();
    batch.push(first());
    s.worker.execute(batch).await;
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    quiet(&mut notes).await;
    assert_eq!(audited(&db, &table).await, expected);
    assert_eq!(s.metrics.audit_copy_refused.get(), u64::from(copy));
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}

/// Both ways of writing records; a `COPY` refused by the table's check runs again with the
/// statement, which the check refuses too.
#[tokio::test]
async fn a_failing_audit_commits_neither_records_nor_notifies() {
    for copy in [false, true] {
        a_failing_audit_commits_neither_records_nor_notifies_by(copy).await;
    }
}

async fn a_failing_audit_commits_neither_records_nor_notifies_by(copy: bool) {
    let db = client().await;
    let table = audit_table(&db).await;
    let mut s = setup_with(Some(Arc::new(TableAudit::with_copy(&table, copy)))).await;
    let channel = unique("chan");
    let (_listener, mut notes) = listen(&channel).await;
    let c = channel.as_str();
    // One transaction: a good record and one the table refuses.
    let mut batch = Batch::default();
    batch.push(audited_request(
        &unique("r"),
        vec![message(Some("m1"), c, "a")],
        vec![message(Some("m1"), c, "env1")],
        &s.inbox,
    ));
    batch.push(audited_request(
        &unique("r"),
        vec![message(Some("m2"), c, "b")],
        vec![message(Some("m2"), c, "bad")],
        &s.inbox,
    ));
    s.worker.execute(batch).await;
    for _ in 0..2 {
        let reply = next_reply(&mut s.replies).await;
        assert_eq!(reply.error.as_deref(), Some(crate::batch::UNAVAILABLE));
    }
    assert_eq!(s.metrics.requests_failed.get(), 2);
    assert_eq!(s.metrics.audit_copy_refused.get(), u64::from(copy));
    quiet(&mut notes).await;
    assert!(audited(&db, &table).await.is_empty());

    // The connection is clean for the next batch.
    let mut batch = Batch::default();
    batch.push(audited_request(
        &unique("r"),
        vec![message(Some("m3"), c, "c")],
        vec![message(Some("m3"), c, "env3")],
        &s.inbox,
    ));
    s.worker.execute(batch).await;
    assert_eq!(next_reply(&mut s.replies).await, NotifyReply::ok());
    assert_eq!(take(&mut notes, 1).await, ["c"]);
    assert_eq!(audited(&db, &table).await, [format!("m3 {c} env3")]);

    // Parameters the statement cannot take fail the transaction before it is sent.
    let wrong = Arc::new(TableAudit {
        wrong_types: true,
        ..TableAudit::new(&table)
    });
    let mut w = setup_with(Some(wrong)).await;
    let mut batch = Batch::default();
    batch.push(audited_request(
        &unique("r"),
        vec![message(Some("m4"), c, "d")],
        vec![message(Some("m4"), c, "env4")],
        &w.inbox,
    ));
    w.worker.execute(batch).await;
    let reply = next_reply(&mut w.replies).await;
    assert_eq!(reply.error.as_deref(), Some(crate::batch::UNAVAILABLE));
    quiet(&mut notes).await;
    assert_eq!(audited(&db, &table).await, [format!("m3 {c} env3")]);
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}
