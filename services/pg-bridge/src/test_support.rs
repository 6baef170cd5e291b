//! Helpers for the bridge's tests on the real PostgreSQL and NATS of the test setup
//! (`PGWS_TEST_DB_URI`, `PGWS_TEST_NATS_URL`)
//! (what every crate's tests share is in `pgws-testkit`).

use std::time::Duration;

use pgws_config::{NatsAuth, NatsConfig};
use pgws_proto::{Prefix, Subjects};
use pgws_service::{connect_nats, Readiness};
use tokio::sync::mpsc;
use tokio_postgres::Client;

pub(crate) use pgws_testkit::{db_uri, unique, Proxy};
/// How long a test waits for something that should happen at once.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A bus on the local NATS server, as a bridge process connects to it.
pub(crate) async fn bus() -> pgws_bus::Client {
    let config = NatsConfig {
        url: pgws_testkit::nats_url(),
        subjects: Subjects::new(Prefix::new("pgws").expect("prefix")),
        auth: NatsAuth::default(),
    };
    let link = connect_nats(&config, "pg-bridge-test", &Readiness::new())
        .await
        .expect("the test NATS (PGWS_TEST_NATS_URL)");
    let bus = link.bus();
    tokio::time::timeout(WAIT, bus.flush())
        .await
        .expect("the test NATS answers")
        .expect("NATS flushes");
    bus
}

/// A plain client (its connection driven by a test task).
pub(crate) async fn client() -> Client {
    pgws_testkit::connect(&db_uri())
        .await
        .expect("the test database (PGWS_TEST_DB_URI) is reachable")
}

/// LISTENs on `channel`; the payloads arrive on the receiver, in order.
pub(crate) async fn listen(channel: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut heard) = pgws_testkit::listen(&db_uri(), &[channel])
        .await
        .expect("LISTEN on the test database (PGWS_TEST_DB_URI)");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((_, payload, _)) = heard.recv().await {
            if tx.send(payload).is_err() {
                break;
            }
        }
    });
    (client, rx)
}

/// The next `n` items of `rx`, failing the test after [`WAIT`].
pub(crate) async fn take<T>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(item)) => out.push(item),
            _ => panic!("got {} of {n} items", out.len()),
        }
    }
    out
}

/// Waits until `check` holds, failing the test after [`WAIT`].
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
