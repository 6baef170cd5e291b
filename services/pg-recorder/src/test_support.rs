//! Helpers for the tests that use the real PostgreSQL and NATS of the development setup: a
//! database of its own per test (the audit schema is per database) and a NATS prefix of its
//! own, both removed when the test ends, even when it fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, NoTls};

/// The local PostgreSQL (trust auth), where test databases are created.
pub(crate) const ADMIN_URI: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The local NATS server.
pub(crate) const NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long a test waits for something that should happen soon.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// A lower-case name no other test (or earlier run) uses: letters, digits and `_`.
pub(crate) fn unique(what: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{what}{}_{:x}_{n}", std::process::id(), nanos % (1 << 40))
}

/// A client whose connection a test task drives.
pub(crate) async fn connect(uri: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(uri, NoTls)
        .await
        .expect("the test PostgreSQL at 127.0.0.1:5432 is reachable");
    tokio::spawn(connection);
    client
}

/// A database of the test's own, dropped (with its connections) when this is dropped.
pub(crate) struct TestDb {
    pub(crate) name: String,
    pub(crate) uri: String,
}

impl TestDb {
    pub(crate) async fn create() -> Self {
        let name = unique("pgws_rec_");
        connect(ADMIN_URI)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let uri = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self { name, uri }
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

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        off_runtime(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(ADMIN_URI, NoTls).await {
                tokio::spawn(conn);
                if let Err(e) = client.batch_execute(&sql).await {
                    eprintln!("{sql}: {e}");
                }
            }
        });
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

/// Runs `f` to completion on a runtime of its own in another thread (from `Drop`, where the
/// test's runtime cannot be awaited).
fn off_runtime(f: impl std::future::Future<Output = ()> + Send + 'static) {
    let done = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async move {
                drop(tokio::time::timeout(Duration::from_secs(10), f).await);
            });
        }
    });
    drop(done.join());
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
pub(crate) async fn eventually_for<F, Fut>(what: &str, wait: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy to the test PostgreSQL that refuses connections while it is closed, to play a
/// database that is down.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
}

impl Proxy {
    /// Listens on a free port, closed.
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds");
        let port = listener.local_addr().expect("address").port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        let (gate, token) = (open.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => r,
                };
                let Ok((mut inbound, _)) = accepted else {
                    return;
                };
                if !gate.load(Ordering::Relaxed) {
                    continue;
                }
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, open, stop }
    }

    /// Lets connections through from now on.
    pub(crate) fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
