//! The batch transaction against the real PostgreSQL, a database per test: idempotence, dead
//! letters, dispatcher order and failures, transient errors.

use std::str::FromStr;

use pgws_service::Metrics;

use super::*;
use crate::record::OwnedMeta;
use crate::test_support::{envelope, now, TestDb};

fn database(test: &TestDb) -> Database {
    Database {
        pg: PgConfig::from_str(&test.uri).expect("uri"),
        client: None,
        up: Arc::new(AtomicBool::new(false)),
        partitions: Partitions::default(),
        attempt: 0,
    }
}

fn headers(id: Option<&str>) -> OwnedMeta {
    let mut h = OwnedMeta::default();
    if let Some(id) = id {
        h.insert(pgws_proto::headers::MSG_ID, id);
    }
    h.insert(pgws_proto::headers::NOTIFY_CHANNEL, "listen");
    h
}

/// A batch of well-formed records with the given ids and payloads, stream sequences from `seq`.
fn batch_of(records: &[(&str, &str)], seq: u64) -> Batch {
    let mut batch = Batch::default();
    let at = now();
    for (i, (id, payload)) in records.iter().enumerate() {
        let body = envelope("chat", payload, at);
        batch.push(
            "s",
            seq + i as u64,
            body.as_bytes(),
            headers(Some(id)).meta(),
        );
    }
    batch
}

async fn count(db: &Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn write(db: &mut Database, mode: &Mode, batch: &Batch) -> RecorderMetrics {
    let metrics = RecorderMetrics::register(&Metrics::new());
    assert!(write_batch(db, mode, batch, &metrics, &CancellationToken::new()).await);
    metrics
}

#[tokio::test]
async fn a_batch_written_twice_makes_each_row_once() {
    let test = TestDb::create().await;
    let mut db = database(&test);
    let ids: Vec<String> = (0..500).map(|i| format!("id-{i}")).collect();
    let records: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "hello")).collect();
    let batch = batch_of(&records, 1);
    let first = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((first.rows.get(), first.duplicates.get()), (500, 0));
    let outcomes =
        |m: &RecorderMetrics, o: &'static str| m.batches.get_or_create(&[("outcome", o)]).get();
    // The first write is a COPY; the second meets the rows, so it is written again skipping
    // them; a batch known to hold redeliveries goes that way at once.
    assert_eq!(outcomes(&first, "conflict"), 0);
    let again = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((again.rows.get(), again.duplicates.get()), (0, 500));
    assert_eq!(outcomes(&again, "conflict"), 1);
    let redelivered = Batch {
        redelivered: true,
        ..batch.clone()
    };
    let third = write(&mut db, &Mode::Table, &redelivered).await;
    assert_eq!((third.rows.get(), third.duplicates.get()), (0, 500));
    assert_eq!(outcomes(&third, "conflict"), 0);
    // Half old, half new, by COPY first: exactly the new half is added.
    let fresh: Vec<String> = (500..750).map(|i| format!("id-{i}")).collect();
    let fresh: Vec<(&str, &str)> = fresh.iter().map(|id| (id.as_str(), "hello")).collect();
    let mut mixed = batch_of(&fresh, 1000);
    mixed.records.extend_from_slice(&batch.records[250..]);
    mixed.positions.extend_from_slice(&batch.positions[250..]);
    let fourth = write(&mut db, &Mode::Table, &mixed).await;
    assert_eq!(outcomes(&fourth, "conflict"), 1);
    assert_eq!((fourth.rows.get(), fourth.duplicates.get()), (250, 250));
    let check = test.client().await;
    assert_eq!(
        count(&check, "SELECT count(DISTINCT id) FROM pgws_audit.messages").await,
        750
    );
    assert_eq!(
        count(&check, "SELECT count(*) FROM pgws_audit.messages").await,
        750
    );
    let row = check
        .query_one(
            "SELECT channel, event, payload, claims->>'mode', notify_channel,
                    abs(extract(epoch FROM received_at)::float8 - $1::float8) < 0.000002
             FROM pgws_audit.messages WHERE id = 'id-7'",
            &[&batch.records[7].received_at],
        )
        .await
        .expect("row");
    let fields: (String, String, String, String, String, bool) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    assert_eq!(
        fields,
        (
            "chat".into(),
            "WebsocketMessage".into(),
            "hello".into(),
            "rw".into(),
            "listen".into(),
            true
        )
    );
}

#[tokio::test]
async fn malformed_records_are_dead_letters_and_the_rest_of_the_batch_is_recorded() {
    let test = TestDb::create().await;
    let mut db = database(&test);
    let mut batch = Batch::default();
    let good = envelope("chat", "g", now());
    let far =
        r#"{"event":"E","channel":"c","payload":"p","claims":{"message_delivered_at":1e300}}"#;
    batch.push("s", 1, good.as_bytes(), headers(Some("g1")).meta());
    batch.push("s", 2, b"not json", headers(Some("bad1")).meta());
    batch.push("s", 3, good.as_bytes(), headers(None).meta());
    batch.push("s", 4, far.as_bytes(), headers(Some("bad3")).meta());
    batch.push("s", 5, b"\xff\x00", headers(Some("bad4")).meta());
    batch.push("s", 6, good.as_bytes(), headers(Some("g2")).meta());
    let metrics = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((metrics.rows.get(), metrics.dead_letters.get()), (2, 4));
    // Written again (a redelivery): nothing new.
    let again = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((again.rows.get(), again.dead_letters.get()), (0, 0));
    let check = test.client().await;
    let dead: Vec<(i64, Option<String>, String, String)> = check
        .query(
            "SELECT stream_seq, msg_id, reason, data FROM pgws_audit.dead_letters ORDER BY stream_seq",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let reasons: Vec<(i64, &str)> = dead.iter().map(|d| (d.0, d.2.as_str())).collect();
    assert_eq!(
        reasons,
        [
            (2, "not a JSON object"),
            (3, "no Nats-Msg-Id header"),
            (
                4,
                "claims.message_delivered_at is not between 1970 and 9999"
            ),
            (5, "not UTF-8"),
        ]
    );
    assert_eq!(dead[0].1.as_deref(), Some("bad1"));
    assert_eq!(dead[0].3, "not json");
    assert_eq!(dead[3].3, "\u{fffd}\u{fffd}");
    assert_eq!(
        count(&check, "SELECT count(*) FROM pgws_audit.messages").await,
        2
    );
}

#[tokio::test]
async fn escaped_surrogates_are_judged_before_the_database() {
    let test = TestDb::create().await;
    let mut db = database(&test);
    let with = |claim: &str| {
        format!(
            r#"{{"event":"E","channel":"c","payload":"p","claims":{{"x":"{claim}","message_delivered_at":1700000000}}}}"#
        )
    };
    let mut batch = Batch::default();
    batch.push(
        "s",
        1,
        with(r"a\udc00b").as_bytes(),
        headers(Some("lone")).meta(),
    );
    batch.push(
        "s",
        2,
        with(r"\ud83d\ude00").as_bytes(),
        headers(Some("pair")).meta(),
    );
    let metrics = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((metrics.rows.get(), metrics.dead_letters.get()), (1, 1));
    let check = test.client().await;
    // The parser's reason: the record never made PostgreSQL refuse the batch.
    let reason: String = check
        .query_one("SELECT reason FROM pgws_audit.dead_letters", &[])
        .await
        .expect("dead letter")
        .get(0);
    assert_eq!(reason, "not a JSON object");
    let x: String = check
        .query_one("SELECT claims->>'x' FROM pgws_audit.messages", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(x, "\u{1f600}");
}

#[tokio::test]
async fn a_record_the_database_refuses_is_a_dead_letter_and_blocks_nothing() {
    let test = TestDb::create().await;
    let check = test.migrated().await;
    // A rule of the user's that refuses some rows.
    check
        .batch_execute(
            "ALTER TABLE pgws_audit.messages ADD CONSTRAINT no_reject CHECK (payload <> 'reject')",
        )
        .await
        .expect("constraint");
    let mut db = database(&test);
    let batch = batch_of(&[("a", "1"), ("b", "reject"), ("c", "3")], 10);
    let metrics = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((metrics.rows.get(), metrics.dead_letters.get()), (2, 1));
    let (reason, headers): (String, serde_json::Value) = check
        .query_one(
            "SELECT reason, headers::text FROM pgws_audit.dead_letters WHERE stream_seq = 11",
            &[],
        )
        .await
        .map(|r| {
            (
                r.get(0),
                serde_json::from_str(r.get::<_, &str>(1)).unwrap_or_default(),
            )
        })
        .expect("dead letter");
    assert!(reason.contains("no_reject"), "{reason}");
    assert_eq!(headers["Nats-Msg-Id"][0], "b");
}

/// `app.record_it(c, p)`: logs its calls in `log`, raising for the payload `boom`.
async fn dispatcher(db: &Client) {
    db.batch_execute(
        "CREATE TABLE log (n serial PRIMARY KEY, channel text, payload text);
         CREATE SCHEMA app;
         CREATE FUNCTION app.record_it(c text, p text) RETURNS text LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO log (channel, payload) VALUES (c, p::json->>'payload');
             IF p::json->>'payload' = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF;
             RETURN NULL;
         END $$;",
    )
    .await
    .expect("dispatcher");
}

async fn log(db: &Client) -> Vec<(String, String)> {
    db.query("SELECT channel, payload FROM log ORDER BY n", &[])
        .await
        .expect("log")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn dispatch_mode() -> Mode {
    Mode::Dispatcher("\"app\".\"record_it\"".to_owned())
}

#[tokio::test]
async fn the_dispatcher_is_called_once_per_message_in_stream_order() {
    let test = TestDb::create().await;
    let check = test.migrated().await;
    dispatcher(&check).await;
    let mut db = database(&test);
    let first = batch_of(
        &[("a", "1"), ("b", "2"), ("c", "3"), ("b", "2"), ("d", "4")],
        1,
    );
    let metrics = write(&mut db, &dispatch_mode(), &first).await;
    assert_eq!((metrics.dispatched.get(), metrics.duplicates.get()), (4, 1));
    // A redelivery of c with a new one after it.
    let second = batch_of(&[("c", "3"), ("e", "5")], 6);
    let metrics = write(&mut db, &dispatch_mode(), &second).await;
    assert_eq!((metrics.dispatched.get(), metrics.duplicates.get()), (1, 1));
    let calls = log(&check).await;
    let payloads: Vec<&str> = calls.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(payloads, ["1", "2", "3", "4", "5"]);
    assert!(calls.iter().all(|(c, _)| c == "listen"));
    // Nothing goes to the messages table in dispatcher mode.
    assert_eq!(
        count(&check, "SELECT count(*) FROM pgws_audit.messages").await,
        0
    );
}

#[tokio::test]
async fn a_large_batch_is_dispatched_in_order() {
    let test = TestDb::create().await;
    let check = test.migrated().await;
    dispatcher(&check).await;
    let mut db = database(&test);
    let ids: Vec<String> = (0..5000).map(|i| format!("id-{i}")).collect();
    let payloads: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    let records: Vec<(&str, &str)> = ids
        .iter()
        .zip(&payloads)
        .map(|(i, p)| (i.as_str(), p.as_str()))
        .collect();
    write(&mut db, &dispatch_mode(), &batch_of(&records, 1)).await;
    let logged: Vec<String> = log(&check).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(logged, payloads);
}

#[tokio::test]
async fn a_raising_dispatcher_call_is_a_dead_letter_and_the_rest_goes_in_order() {
    let test = TestDb::create().await;
    let check = test.migrated().await;
    dispatcher(&check).await;
    let mut db = database(&test);
    let batch = batch_of(&[("a", "1"), ("b", "2"), ("x", "boom"), ("c", "3")], 1);
    let metrics = write(&mut db, &dispatch_mode(), &batch).await;
    assert_eq!(
        (metrics.dispatched.get(), metrics.dead_letters.get()),
        (3, 1)
    );
    let payloads: Vec<String> = log(&check).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, ["1", "2", "3"]);
    let (seq, id, reason): (i64, String, String) = check
        .query_one(
            "SELECT stream_seq, msg_id, reason FROM pgws_audit.dead_letters",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .expect("dead letter");
    assert_eq!((seq, id.as_str()), (3, "x"));
    assert!(reason.contains("boom refused"), "{reason}");
    // The failed call left no ledger row: only the three that were called are there.
    assert_eq!(
        count(&check, "SELECT count(*) FROM pgws_audit.dispatched").await,
        3
    );
}

#[tokio::test]
async fn a_transient_failure_retries_the_batch_and_blames_no_record() {
    let test = TestDb::create().await;
    let check = test.migrated().await;
    dispatcher(&check).await;
    // The first two calls fail with a serialization failure (the counter is a sequence:
    // sequences survive a rollback).
    check
        .batch_execute(
            "CREATE SEQUENCE failures;
             CREATE OR REPLACE FUNCTION app.record_it(c text, p text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('failures') <= 2 THEN
                     RAISE EXCEPTION 'try again' USING ERRCODE = 'serialization_failure';
                 END IF;
                 INSERT INTO log (channel, payload) VALUES (c, p::json->>'payload');
                 RETURN NULL;
             END $$;",
        )
        .await
        .expect("flaky function");
    let mut db = database(&test);
    let batch = batch_of(&[("a", "1"), ("b", "2")], 1);
    let metrics = write(&mut db, &dispatch_mode(), &batch).await;
    assert_eq!(
        (metrics.dispatched.get(), metrics.dead_letters.get()),
        (2, 0)
    );
    assert_eq!(
        metrics
            .batches
            .get_or_create(&[("outcome", "retried")])
            .get(),
        2
    );
    let payloads: Vec<String> = log(&check).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, ["1", "2"]);
}

#[tokio::test]
async fn the_batch_waits_for_the_database_and_is_written_when_it_comes() {
    let test = TestDb::create().await;
    let mut db = database(&test);
    // A port where nothing listens, then the real one.
    db.pg = PgConfig::from_str("postgres://postgres@127.0.0.1:1/x").expect("uri");
    let token = CancellationToken::new();
    let metrics = RecorderMetrics::register(&Metrics::new());
    let batch = batch_of(&[("a", "1")], 1);
    let stop = token.clone();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    // Shutdown while the database is away: the batch is not written (false: not acked).
    assert!(!write_batch(&mut db, &Mode::Table, &batch, &metrics, &token).await);
    stopper.await.expect("stopper");
    assert!(!db.up.load(Ordering::Relaxed));
    db.pg = PgConfig::from_str(&test.uri).expect("uri");
    let metrics = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!(metrics.rows.get(), 1);
    assert!(db.up.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_record_of_several_envelopes_makes_a_row_each_and_dead_letters_per_part() {
    let test = TestDb::create().await;
    let mut db = database(&test);
    let at = now();
    let good = |p: &str| envelope("chat", p, at);
    let bad = r#"{"event":"E","channel":"c","payload":"p"}"#;
    let body = [good("one"), bad.to_owned(), good("three"), bad.to_owned()].join("\n");
    let mut h = headers(Some("m-1"));
    h.insert(pgws_proto::headers::MSG_IDS, "m-1,m-2,m-3,m-4");
    let mut batch = Batch::default();
    batch.push("s", 5, body.as_bytes(), h.meta());
    let metrics = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!((metrics.rows.get(), metrics.dead_letters.get()), (2, 2));
    // Redelivered: nothing new.
    let again = Batch {
        redelivered: true,
        ..batch.clone()
    };
    let metrics = write(&mut db, &Mode::Table, &again).await;
    assert_eq!(metrics.rows.get(), 0);
    let check = test.client().await;
    let rows = check
        .query(
            "SELECT id, payload FROM pgws_audit.messages ORDER BY id",
            &[],
        )
        .await
        .expect("rows");
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [("m-1".into(), "one".into()), ("m-3".into(), "three".into())]
    );
    let dead = check
        .query(
            "SELECT stream_seq, part, msg_id FROM pgws_audit.dead_letters ORDER BY part",
            &[],
        )
        .await
        .expect("dead letters");
    let dead: Vec<(i64, i32, String)> = dead
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(dead, [(5, 1, "m-2".into()), (5, 3, "m-4".into())]);
}

#[tokio::test]
async fn a_batch_copied_then_redelivered_meets_its_rows_to_the_microsecond() {
    // Times with every kind of sub-microsecond remainder: the COPY path and the INSERT path
    // must turn each into the same timestamp, or a redelivery would add a second row.
    let test = TestDb::create().await;
    let mut db = database(&test);
    let mut batch = Batch::default();
    for i in 0..1000u64 {
        let at = 1_764_000_000.0 + i as f64 * 0.000_123_7;
        let body = envelope("chat", "t", at);
        batch.push(
            "s",
            i,
            body.as_bytes(),
            headers(Some(&format!("t-{i}"))).meta(),
        );
    }
    let first = write(&mut db, &Mode::Table, &batch).await;
    assert_eq!(first.rows.get(), 1000);
    let again = Batch {
        redelivered: true,
        ..batch.clone()
    };
    let second = write(&mut db, &Mode::Table, &again).await;
    assert_eq!((second.rows.get(), second.duplicates.get()), (0, 1000));
    let check = test.client().await;
    assert_eq!(
        count(&check, "SELECT count(*) FROM pgws_audit.messages").await,
        1000
    );
}
