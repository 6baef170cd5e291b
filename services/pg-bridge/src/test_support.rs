//! Helpers for the tests that use the real PostgreSQL and NATS of the development setup.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::db::quote_ident;

/// The local PostgreSQL (trust auth).
pub(crate) const DB_URI: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The local NATS server.
pub(crate) const NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long a test waits for something that should happen at once.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(what: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{what}-{}-{nanos}-{n}", std::process::id())
}

/// A plain client (its connection driven by a test task).
pub(crate) async fn client() -> Client {
    let (client, connection) = tokio_postgres::connect(DB_URI, NoTls)
        .await
        .expect("the test database at 127.0.0.1:5432 is reachable");
    tokio::spawn(connection);
    client
}

/// LISTENs on `channel`; the payloads arrive on the receiver, in order.
pub(crate) async fn listen(channel: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(DB_URI, NoTls)
        .await
        .expect("the test database at 127.0.0.1:5432 is reachable");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
        .await
        .expect("LISTEN");
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

/// A TCP proxy to the test database that can be cut, to play a database outage.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    stop: tokio_util::sync::CancellationToken,
}

impl Proxy {
    /// Listens on `port` (0: any) and forwards to the test database.
    pub(crate) async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy binds");
        let port = listener.local_addr().expect("address").port();
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => r,
                };
                let Ok((mut inbound, _)) = accepted else {
                    return;
                };
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
        Self { port, stop }
    }

    /// Closes the listener and cuts every connection.
    pub(crate) fn cut(&self) {
        self.stop.cancel();
    }
}
