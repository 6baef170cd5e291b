//! The in-transaction writer against the real PostgreSQL, a database per test: the statement
//! runs in a transaction that NOTIFYs the messages, as the bridge runs it; its rows are the
//! rows the recorder makes of the same envelopes (recorded through its consumer, from a log in
//! memory, into a database of its own); a message written twice is there once; the
//! dispatcher is called in order, once; a rolled back transaction leaves nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pgws_bus::{Log, MemoryLog};
use pgws_config::Settings;
use pgws_proto::{Envelope, EnvelopeClaims};
use pgws_service::{Host, Metrics, Readiness, Shutdown};
use serde_json::{json, Map, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::*;
use crate::test_support::{eventually, now, TestDb};
use crate::RecorderConfig;

/// The channel client messages are NOTIFYed on.
const LISTEN: &str = "postgres-websockets-listener";

fn config(db_uri: &str, dispatcher: Option<&str>) -> RecorderConfig {
    let mut pairs = vec![
        ("PGWS_DB_URI", db_uri),
        ("PGWS_NATS_PREFIX", "intx"),
        ("PGWS_RETRIES", "1"),
    ];
    if let Some(f) = dispatcher {
        pairs.push(("PGWS_RECORDER_DISPATCHER", f));
    }
    RecorderConfig::from_settings(&Settings::from_pairs(&pairs).expect("settings")).expect("config")
}

fn host() -> Host {
    Host::local(
        pgws_bus::Client::new(pgws_bus::Local::new()),
        Metrics::new(),
        Readiness::new(),
    )
}

/// The writer of `test`'s database, with its upkeep stopped when the test ends.
struct Prepared {
    it: InTransaction,
    host: Host,
    shutdown: Shutdown,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.shutdown.token.cancel();
    }
}

async fn prepare(test: &TestDb, dispatcher: Option<&str>) -> Prepared {
    let (shutdown, host) = (Shutdown::new(), host());
    let it = crate::prepare_in_process(&config(&test.uri, dispatcher), shutdown.clone(), &host)
        .await
        .expect("prepared");
    Prepared { it, host, shutdown }
}

fn message(id: Option<&str>, payload: &str) -> Notification {
    Notification {
        id: id.map(str::to_owned),
        channel: LISTEN.to_owned(),
        payload: payload.to_owned(),
    }
}

/// An envelope as the gateway makes it.
fn envelope(event: &str, channel: &str, payload: &str, claims: &Value, at: f64) -> String {
    let claims: Map<String, Value> = claims.as_object().cloned().unwrap_or_default();
    Envelope::new(event, channel, payload, &EnvelopeClaims::new(&claims), at).to_json()
}

/// What the bridge does: in one transaction, the audit statement (prepared) then a NOTIFY per
/// message; committed or rolled back. Returns the statement's row.
async fn notify(
    db: &mut Client,
    it: &InTransaction,
    records: &[Notification],
    commit: bool,
) -> Vec<i64> {
    let tx = db.transaction().await.expect("begin");
    let statement = tx.prepare(it.sql()).await.expect("prepare");
    let params = it.params(records);
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as _).collect();
    let row = tx
        .query_one(&statement, &refs)
        .await
        .expect("audit statement");
    for n in records {
        tx.execute("SELECT pg_notify($1, $2)", &[&n.channel, &n.payload])
            .await
            .expect("notify");
    }
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
    (0..row.len()).map(|i| row.get(i)).collect()
}

type Row = (String, String, String, String, String, SystemTime, String);

async fn rows(db: &Client) -> Vec<Row> {
    db.query(
        "SELECT id, channel, event, payload, claims::text, received_at, notify_channel
         FROM pgws_audit.messages ORDER BY id, received_at",
        &[],
    )
    .await
    .expect("rows")
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        )
    })
    .collect()
}

type Dead = (Option<String>, String, String, String);

async fn dead_letters(db: &Client) -> Vec<Dead> {
    db.query(
        "SELECT msg_id, reason, data, headers::text FROM pgws_audit.dead_letters ORDER BY msg_id",
        &[],
    )
    .await
    .expect("dead letters")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn count(db: &Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Envelopes of every kind, stamped today and yesterday (whose partitions are made ahead),
/// with awkward times, texts and claims, and some the recorder refuses.
fn mixed() -> Vec<Notification> {
    let at = now();
    let claims =
        json!({"mode": "rw", "sub": "ann", "channels": ["chat", "b"], "n": {"x": null, "y": 1.5}});
    let good = [
        (
            "m-01",
            envelope("WebsocketMessage", "chat", "hello", &claims, at),
        ),
        (
            "m-02",
            envelope(
                "WebsocketMessage",
                "chat",
                "line\nbreak \"quoted\" é ✓ \u{1f600}",
                &claims,
                at + 0.000_000_4,
            ),
        ),
        (
            "m-03",
            envelope(
                "ConnectionOpen",
                "server-info",
                "chat,b",
                &json!({"mode": "r"}),
                at - 86_400.0,
            ),
        ),
        (
            "m-04",
            envelope(
                "WebsocketMessage",
                "c\\h",
                "{\"json\": [1, 2]}",
                &json!({}),
                at + 0.123_456_789,
            ),
        ),
        (
            "m-05",
            envelope(
                "ConnectionClose",
                "chat",
                "",
                &json!({"escaped": "\\u0041"}),
                at,
            ),
        ),
    ];
    let mut records: Vec<Notification> = good
        .iter()
        .map(|(id, body)| message(Some(id), body))
        .collect();
    // What the recorder makes dead letters of.
    records.push(message(Some("x-1"), "not json"));
    records.push(message(
        Some("x-2"),
        r#"{"event":"E","channel":"c","payload":"p"}"#,
    ));
    records.push(message(
        Some("x-3"),
        r#"{"event":"E\u0000","channel":"c","payload":"p","claims":{"message_delivered_at":1}}"#,
    ));
    records.push(message(
        Some("x-4"),
        r#"{"event":"E","channel":"c","payload":"p","claims":{"x":"\udc00","message_delivered_at":1700000000}}"#,
    ));
    records
}

#[tokio::test]
async fn rows_and_dead_letters_equal_the_recorders_for_the_same_envelopes() {
    let records = mixed();

    // The recorder, through its consumer, from a log in memory.
    let by_recorder = TestDb::create().await;
    let log = MemoryLog::new(Duration::from_secs(30));
    let config_a = config(&by_recorder.uri, None);
    let subject = config_a.nats.subjects.audit();
    for n in &records {
        let mut h = pgws_bus::Headers::new();
        h.insert(
            pgws_proto::headers::NOTIFY_CHANNEL.to_owned(),
            n.channel.clone(),
        );
        let id = n.id.as_deref().unwrap_or_default();
        log.append(&subject, id, h, Bytes::from(n.payload.clone()))
            .await
            .expect("appended");
    }
    let shutdown = Shutdown::new();
    let recorder = tokio::spawn(crate::run_on(
        config_a,
        host(),
        Arc::new(log.clone()),
        shutdown.clone(),
    ));
    let a = by_recorder.client().await;
    eventually("the recorder's rows", || async {
        log.pending(
            &config(&by_recorder.uri, None)
                .nats
                .subjects
                .recorder_consumer(),
        )
        .await
        .is_ok_and(|n| n == 0)
    })
    .await;
    shutdown.token.cancel();
    recorder.await.expect("joins").expect("clean exit");

    // The same messages in a NOTIFY transaction, with a session LISTENing.
    let in_tx = TestDb::create().await;
    let writer = prepare(&in_tx, None).await;
    let (_listening, mut heard) = pgws_testkit::listen(&in_tx.uri, &[LISTEN])
        .await
        .expect("listen");
    let mut b = in_tx.client().await;
    let counts = notify(&mut b, &writer.it, &records, true).await;
    assert_eq!(counts, [5, 4], "rows written, dead letters");
    for n in &records {
        let (channel, payload, _) = tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await
            .expect("a notification")
            .expect("listening");
        assert_eq!(
            (channel.as_str(), payload.as_str()),
            (LISTEN, n.payload.as_str())
        );
    }

    let expected = rows(&a).await;
    assert_eq!(expected.len(), 5);
    assert_eq!(rows(&b).await, expected);
    let expected = dead_letters(&a).await;
    assert_eq!(expected.len(), 4);
    assert_eq!(dead_letters(&b).await, expected);
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM pgws_audit.dead_letters WHERE stream = 'in-transaction'"
        )
        .await,
        4
    );
    // What was handed over is counted.
    let metrics = writer.host.metrics.render();
    assert!(
        metrics.contains("pgws_recorder_in_transaction_records_total{outcome=\"recorded\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgws_recorder_in_transaction_records_total{outcome=\"dead_letter\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_message_written_twice_is_there_once() {
    let test = TestDb::create().await;
    let writer = prepare(&test, None).await;
    let mut db = test.client().await;
    let at = now();
    let first = envelope("WebsocketMessage", "chat", "1", &json!({"mode": "rw"}), at);
    let second = envelope("WebsocketMessage", "chat", "2", &json!({"mode": "rw"}), at);
    // The same id twice in one transaction (a request and its retry in one batch)...
    let records = [
        message(Some("d-1"), &first),
        message(Some("d-1"), &first),
        message(Some("d-2"), &second),
        message(Some("d-bad"), "not json"),
    ];
    assert_eq!(notify(&mut db, &writer.it, &records, true).await, [2, 1]);
    // ... and again in a later one (a retry after its first transaction committed).
    assert_eq!(notify(&mut db, &writer.it, &records, true).await, [0, 0]);
    let payloads: Vec<(String, String)> = rows(&db).await.into_iter().map(|r| (r.0, r.3)).collect();
    assert_eq!(
        payloads,
        [("d-1".into(), "1".into()), ("d-2".into(), "2".into())]
    );
    assert_eq!(dead_letters(&db).await.len(), 1);
}

/// An envelope stamped 2001-09-09 (UTC): no partition, and none can be made in a NOTIFY
/// transaction.
fn unplaced() -> String {
    envelope(
        "WebsocketMessage",
        "chat",
        "old",
        &json!({}),
        1_000_000_000.0,
    )
}

/// The writer's `COPY` of `records` in a transaction of its own, committed.
async fn copy(
    db: &mut Client,
    it: &InTransaction,
    records: &[Notification],
) -> Result<u64, tokio_postgres::Error> {
    use futures::SinkExt;
    let data = it.copy(records).expect("COPY data");
    let tx = db.transaction().await?;
    let sink = tx
        .copy_in::<_, Bytes>(it.copy_sql().expect("a COPY"))
        .await?;
    futures::pin_mut!(sink);
    sink.send(data).await?;
    let n = sink.finish().await?;
    tx.commit().await?;
    Ok(n)
}

#[tokio::test]
async fn the_copy_makes_the_rows_the_statement_makes() {
    let records = mixed();
    let writer_test = TestDb::create().await;
    let writer = prepare(&writer_test, None).await;
    // Records of which some are dead letters are for the statement.
    assert!(writer.it.copy(&records).is_none());
    let good: Vec<Notification> = records
        .iter()
        .filter(|n| writer.it.copy(std::slice::from_ref(*n)).is_some())
        .cloned()
        .collect();
    assert_eq!(good.len(), 5);

    let mut by_statement = writer_test.client().await;
    assert_eq!(
        notify(&mut by_statement, &writer.it, &good, true).await,
        [5, 0]
    );
    let by_copy_test = TestDb::create().await;
    let by_copy_writer = prepare(&by_copy_test, None).await;
    let mut by_copy = by_copy_test.client().await;
    assert_eq!(
        copy(&mut by_copy, &by_copy_writer.it, &good)
            .await
            .expect("copied"),
        5
    );
    let expected = rows(&by_statement).await;
    assert_eq!(expected.len(), 5);
    assert_eq!(rows(&by_copy).await, expected);

    // What the statement skips or diverts, the COPY refuses with the codes the bridge then
    // runs the statement for: a row written before...
    let e = copy(&mut by_copy, &by_copy_writer.it, &good[..1])
        .await
        .expect_err("a row written before");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    // ... and one whose day has no partition.
    let old = unplaced();
    let e = copy(
        &mut by_copy,
        &by_copy_writer.it,
        &[message(Some("old"), &old)],
    )
    .await
    .expect_err("a day without partition");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    assert_eq!(rows(&by_copy).await, expected);

    // The dispatcher has no COPY.
    let dispatching = InTransaction::new(
        Mode::Dispatcher("app.record_it".to_owned()),
        InProcessMetrics::register(&Metrics::new()),
    );
    assert!(dispatching.copy_sql().is_none());
    assert!(dispatching.copy(&good).is_none());
}

/// `app.record_it(c, p)`: logs its calls in `log`.
async fn dispatcher(db: &Client) {
    db.batch_execute(
        "CREATE TABLE log (n serial PRIMARY KEY, channel text, payload text);
         CREATE SCHEMA app;
         CREATE FUNCTION app.record_it(c text, p text) RETURNS void LANGUAGE sql AS $$
             INSERT INTO log (channel, payload) VALUES (c, p::json->>'payload') $$;",
    )
    .await
    .expect("dispatcher");
}

async fn calls(db: &Client) -> Vec<(String, String)> {
    db.query("SELECT channel, payload FROM log ORDER BY n", &[])
        .await
        .expect("log")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn the_dispatcher_is_called_in_the_transaction_in_order_once() {
    let test = TestDb::create().await;
    let writer = prepare(&test, Some("app.record_it")).await;
    let mut db = test.client().await;
    dispatcher(&db).await;
    let at = now();
    let env = |p: &str| envelope("WebsocketMessage", "chat", p, &json!({"mode": "rw"}), at);
    let records = [
        message(Some("a"), &env("1")),
        message(Some("b"), &env("2")),
        message(Some("a"), &env("1")),
        message(Some("bad"), "[1]"),
        message(Some("c"), &env("3")),
    ];
    let counts = notify(&mut db, &writer.it, &records, true).await;
    assert_eq!(&counts[1..], [3, 1], "calls, dead letters");
    let expected: Vec<(String, String)> = ["1", "2", "3"]
        .iter()
        .map(|p| (LISTEN.to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(calls(&db).await, expected);
    // Again (a retried request), with a new one: only the new one is called.
    let again = [message(Some("b"), &env("2")), message(Some("d"), &env("4"))];
    let counts = notify(&mut db, &writer.it, &again, true).await;
    assert_eq!(&counts[1..], [1, 0]);
    assert_eq!(calls(&db).await.len(), 4);
    assert_eq!(calls(&db).await[3].1, "4");
    assert_eq!(
        count(&db, "SELECT count(*) FROM pgws_audit.messages").await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM pgws_audit.dispatched").await,
        4
    );
    assert_eq!(dead_letters(&db).await[0].1, "not a JSON object");
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_nothing() {
    for dispatch in [None, Some("app.record_it")] {
        let test = TestDb::create().await;
        let writer = prepare(&test, dispatch).await;
        let mut db = test.client().await;
        dispatcher(&db).await;
        let (_listening, mut heard) = pgws_testkit::listen(&test.uri, &[LISTEN])
            .await
            .expect("listen");
        let at = now();
        let records = [
            message(
                Some("r-1"),
                &envelope("WebsocketMessage", "chat", "gone", &json!({}), at),
            ),
            message(Some("r-2"), "not json"),
        ];
        notify(&mut db, &writer.it, &records, false).await;
        for table in [
            "pgws_audit.messages",
            "pgws_audit.dead_letters",
            "pgws_audit.dispatched",
            "log",
        ] {
            let n = count(&db, &format!("SELECT count(*) FROM {table}")).await;
            assert_eq!(n, 0, "{table} ({dispatch:?})");
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), heard.recv())
                .await
                .is_err(),
            "a rolled back NOTIFY is not heard"
        );
        // The same messages later, committed: written as if never tried.
        let counts = notify(&mut db, &writer.it, &records, true).await;
        assert_eq!(counts[counts.len() - 2..], [1, 1], "{dispatch:?}");
    }
}

#[tokio::test]
async fn a_message_of_a_day_without_partition_is_a_dead_letter_and_the_notify_commits() {
    let test = TestDb::create().await;
    let writer = prepare(&test, None).await;
    let mut db = test.client().await;
    let old = unplaced();
    let new = envelope("WebsocketMessage", "chat", "new", &json!({}), now());
    let records = [message(Some("old"), &old), message(Some("new"), &new)];
    assert_eq!(notify(&mut db, &writer.it, &records, true).await, [1, 1]);
    assert_eq!(notify(&mut db, &writer.it, &records, true).await, [0, 0]);
    let dead = dead_letters(&db).await;
    assert_eq!(dead.len(), 1);
    let (id, reason, data, headers) = &dead[0];
    assert_eq!(id.as_deref(), Some("old"));
    assert!(reason.contains("2001-09-09"), "{reason}");
    assert_eq!(data, &old);
    let headers: Value = serde_json::from_str(headers).expect("headers");
    assert_eq!(
        headers,
        json!({"Nats-Msg-Id": ["old"], "Pgws-Notify-Channel": [LISTEN]})
    );
    assert_eq!(rows(&db).await.len(), 1);
}

#[tokio::test]
async fn prepare_makes_the_coming_days_partitions_and_says_ready() {
    let test = TestDb::create().await;
    let writer = prepare(&test, None).await;
    let db = test.client().await;
    let today = crate::schema::day_of(now());
    let names: Vec<String> = db
        .query(
            "SELECT to_char(date '1970-01-01' + d, '\"messages_\"YYYYMMDD') FROM unnest($1::int[]) AS d",
            &[&vec![today - 1, today, today + 1]],
        )
        .await
        .expect("names")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for name in names {
        let exists: bool = db
            .query_one(
                "SELECT to_regclass('pgws_audit.' || $1) IS NOT NULL",
                &[&name],
            )
            .await
            .expect("partition")
            .get(0);
        assert!(exists, "{name}");
    }
    assert!(writer.host.readiness.failing().is_empty());
    eventually("the first upkeep run", || async {
        writer
            .host
            .metrics
            .render()
            .contains("pgws_recorder_upkeep_runs_total{outcome=\"ok\"} 1")
    })
    .await;
}

#[tokio::test]
async fn prepare_gives_up_when_the_database_never_answers() {
    let shutdown = Shutdown::new();
    let config = config("postgres://postgres@127.0.0.1:1/x", None);
    let e = crate::prepare_in_process(&config, shutdown, &host())
        .await
        .expect_err("no database");
    assert!(format!("{e:#}").contains("1 attempts"), "{e:#}");
}

#[test]
fn dead_letter_keys_are_stable_and_apart() {
    assert_eq!(key(Some("a"), "x"), key(Some("a"), "y"));
    assert_ne!(key(Some("a"), "x"), key(Some("b"), "x"));
    assert_ne!(key(None, "a"), key(Some("a"), "a"));
    assert!(i64::try_from(key(Some("\u{1f600}"), "")).is_ok());
    // FNV-1a of [1, b'a'], kept to 63 bits: the same on every build.
    assert_eq!(key(Some("a"), ""), 0x082f_4307_b4e8_c4d7);
}
