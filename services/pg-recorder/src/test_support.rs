//! Helpers for the tests that use the real PostgreSQL and NATS of the development setup: a
//! database of its own per test (the audit schema is per database) and a NATS prefix of its
//! own, both removed when the test ends, even when it fails.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgws_testkit::{off_runtime, unique, TempDb};
use tokio_postgres::Client;

pub(crate) use pgws_testkit::Proxy;

/// The local NATS server.
pub(crate) const NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long a test waits for something that should happen soon.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// A client whose connection a test task drives.
pub(crate) async fn connect(uri: &str) -> Client {
    pgws_testkit::connect(uri)
        .await
        .expect("the test PostgreSQL (PGWS_TEST_DB_URI) is reachable")
}

/// A database of the test's own, dropped (with its connections) when this is dropped.
pub(crate) struct TestDb(TempDb);

impl std::ops::Deref for TestDb {
    type Target = TempDb;

    fn deref(&self) -> &TempDb {
        &self.0
    }
}

impl TestDb {
    pub(crate) async fn create() -> Self {
        Self(TempDb::create().await.expect("CREATE DATABASE"))
    }

    pub(crate) async fn client(&self) -> Client {
        connect(&self.uri).await
    }

    /// A migrated client.
    pub(crate) async fn migrated(&self) -> Client {
        let mut client = self.client().await;
        crate::schema::migrate(&mut client).await.expect("migrate");
        client
    }
}

/// The test streams' limits (JetStream reserves a stream's byte limit up front: keep it small).
pub(crate) const AUDIT: pgws_config::AuditConfig = pgws_config::AuditConfig {
    enabled: true,
    max_bytes: 16 << 20,
    max_age: Duration::from_secs(3600),
    replicas: 1,
};

/// A NATS prefix of the test's own; its audit stream is deleted when this is dropped.
pub(crate) struct TestNats {
    pub(crate) prefix: String,
    pub(crate) subjects: pgws_proto::Subjects,
    pub(crate) js: async_nats::jetstream::Context,
}

impl TestNats {
    pub(crate) async fn new() -> Self {
        let prefix = unique("rec");
        let subjects = pgws_proto::Subjects::new(pgws_proto::Prefix::new(&prefix).expect("prefix"));
        let client = async_nats::connect(NATS_URL)
            .await
            .expect("NATS at 127.0.0.1:4222");
        let js = async_nats::jetstream::new(client);
        // The stream exists before anything is published, as when a gateway started first.
        pgws_service::ensure_audit_stream(&js, &subjects, &AUDIT, std::future::pending())
            .await
            .expect("audit stream");
        Self {
            prefix,
            subjects,
            js,
        }
    }

    /// Publishes one record and waits for the stream's acknowledgement.
    pub(crate) async fn publish(&self, id: Option<&str>, body: &str) {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = id {
            headers.insert(pgws_proto::headers::MSG_ID, id);
        }
        headers.insert(pgws_proto::headers::NOTIFY_CHANNEL, "listen");
        self.js
            .publish_with_headers(self.subjects.audit(), headers, body.to_owned().into())
            .await
            .expect("publish")
            .await
            .expect("stream ack");
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        // A client of its own: this one's connection runs on the test's runtime, which is
        // blocked here.
        let name = self.subjects.audit_stream();
        off_runtime(async move {
            if let Ok(client) = async_nats::connect(NATS_URL).await {
                drop(
                    async_nats::jetstream::new(client)
                        .delete_stream(&name)
                        .await,
                );
            }
        });
    }
}

/// An envelope as a gateway publishes it.
pub(crate) fn envelope(channel: &str, payload: &str, at: f64) -> String {
    serde_json::json!({
        "event": "WebsocketMessage",
        "channel": channel,
        "payload": payload,
        "claims": {"mode": "rw", "message_delivered_at": at},
    })
    .to_string()
}

/// Now, in unix seconds.
pub(crate) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Waits until `check` holds, failing the test after [`WAIT`].
pub(crate) async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_for(what, WAIT, check).await;
}

/// Waits until `check` holds, failing the test after `wait`.
pub(crate) async fn eventually_for<F, Fut>(what: &str, wait: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        pgws_testkit::eventually(wait, check).await,
        "timed out waiting for {what}"
    );
}
