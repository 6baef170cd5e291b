//! The whole recorder against the real NATS and PostgreSQL: records published to the audit
//! stream end up in the table and leave the stream; the recorder starts while PostgreSQL is
//! down and catches up; shutdown acknowledges exactly what it committed.

use pgws_config::Settings;

use super::*;
use crate::test_support::{
    connect, envelope, eventually, eventually_for, now, Proxy, TestDb, TestNats, AUDIT, NATS_URL,
};

fn config(db_uri: &str, nats: &TestNats, batch_size: usize) -> RecorderConfig {
    let batch_size = batch_size.to_string();
    let max_bytes = AUDIT.max_bytes.to_string();
    let max_age = AUDIT.max_age.as_secs().to_string();
    let settings = Settings::from_pairs(&[
        ("PGWS_DB_URI", db_uri),
        ("PGWS_NATS_URL", NATS_URL),
        ("PGWS_NATS_PREFIX", &nats.prefix),
        ("PGWS_ADMIN_PORT", "0"),
        ("PGWS_AUDIT_MAX_BYTES", &max_bytes),
        ("PGWS_AUDIT_MAX_AGE", &max_age),
        ("PGWS_RECORDER_BATCH_SIZE", &batch_size),
    ])
    .expect("settings");
    RecorderConfig::from_settings(&settings).expect("config")
}

/// Rows in the messages table, 0 while the schema does not exist.
async fn rows(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM pgws_audit.messages", &[])
        .await
        .map_or(0, |r| r.get(0))
}

/// Records still in the audit stream (a work queue: acknowledged ones leave it).
async fn in_stream(nats: &TestNats) -> u64 {
    match nats.js.get_stream(nats.subjects.audit_stream()).await {
        Ok(mut s) => s.info().await.map_or(u64::MAX, |i| i.state.messages),
        Err(_) => u64::MAX,
    }
}

async fn publish_many(nats: &TestNats, run: &str, n: usize) {
    let at = now();
    for i in 0..n {
        nats.publish(
            Some(&format!("{run}-{i}")),
            &envelope("chat", &i.to_string(), at),
        )
        .await;
    }
}

/// Cancels the recorder and asserts it returns `Ok` within 10 s.
async fn stop_cleanly(shutdown: &Shutdown, recorder: tokio::task::JoinHandle<anyhow::Result<()>>) {
    shutdown.token.cancel();
    tokio::time::timeout(Duration::from_secs(10), recorder)
        .await
        .expect("stops within 10 s")
        .expect("joins")
        .expect("clean exit");
}

#[tokio::test]
async fn records_are_committed_then_leave_the_stream_and_shutdown_is_clean() {
    let (test, nats) = (TestDb::create().await, TestNats::new().await);
    let shutdown = Shutdown::new();
    let recorder = tokio::spawn(run(config(&test.uri, &nats, 50), shutdown.clone()));
    publish_many(&nats, "a", 300).await;
    nats.publish(Some("bad"), "not json").await;
    nats.publish(None, &envelope("chat", "no id", now())).await;
    let db = connect(&test.uri).await;
    eventually("300 rows", || async { rows(&db).await == 300 }).await;
    eventually("the stream to empty", || async {
        in_stream(&nats).await == 0
    })
    .await;
    let dead: i64 = db
        .query_one("SELECT count(*) FROM pgws_audit.dead_letters", &[])
        .await
        .expect("dead letters")
        .get(0);
    assert_eq!(dead, 2);
    stop_cleanly(&shutdown, recorder).await;
}

#[tokio::test]
async fn the_recorder_starts_while_postgres_is_down_and_catches_up() {
    let (test, nats) = (TestDb::create().await, TestNats::new().await);
    let proxy = Proxy::start(0, false).await;
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, test.name);
    let shutdown = Shutdown::new();
    let recorder = tokio::spawn(run(config(&via_proxy, &nats, 100), shutdown.clone()));
    publish_many(&nats, "b", 500).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        in_stream(&nats).await,
        500,
        "nothing is taken while the database is away"
    );
    proxy.open();
    let db = connect(&test.uri).await;
    eventually("500 rows", || async { rows(&db).await == 500 }).await;
    eventually("the stream to empty", || async {
        in_stream(&nats).await == 0
    })
    .await;
    stop_cleanly(&shutdown, recorder).await;
}

#[tokio::test]
async fn shutdown_mid_stream_acknowledges_exactly_what_it_committed() {
    let (test, nats) = (TestDb::create().await, TestNats::new().await);
    publish_many(&nats, "c", 3000).await;
    let shutdown = Shutdown::new();
    let recorder = tokio::spawn(run(config(&test.uri, &nats, 100), shutdown.clone()));
    let db = connect(&test.uri).await;
    eventually("the first rows", || async { rows(&db).await > 0 }).await;
    stop_cleanly(&shutdown, recorder).await;
    let recorded = rows(&db).await;
    assert!(recorded < 3000, "stopped mid-stream ({recorded})");
    // Every committed record was acknowledged (it left the stream), and no other was.
    eventually("acks to land", || async {
        i64::try_from(in_stream(&nats).await).unwrap_or(i64::MAX) + recorded == 3000
    })
    .await;
    // A second run records the rest, once: at once what the first handed back, after the ack
    // wait anything the server sent the first after it stopped reading.
    let shutdown = Shutdown::new();
    let recorder = tokio::spawn(run(config(&test.uri, &nats, 100), shutdown.clone()));
    eventually_for("3000 rows", Duration::from_secs(45), || async {
        rows(&db).await == 3000
    })
    .await;
    let distinct: i64 = db
        .query_one("SELECT count(DISTINCT id) FROM pgws_audit.messages", &[])
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(distinct, 3000);
    shutdown.token.cancel();
    drop(tokio::time::timeout(Duration::from_secs(10), recorder).await);
}
