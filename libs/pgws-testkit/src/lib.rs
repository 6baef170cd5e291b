//! What the tests of every crate share, on a real PostgreSQL and NATS (never a mock): where
//! they are, names no other test uses, a client and a LISTEN session, a database of a test's
//! own, waiting for a condition, and a TCP proxy to PostgreSQL that plays an outage. A
//! dev-dependency only: nothing here is compiled into a service.
//!
//! The PostgreSQL is [`db_uri`]'s: the test command (`scripts/test.sh`) runs a cluster of its
//! own and points `PGWS_TEST_DB_URI` at it; without that variable (a `cargo test` by hand), the
//! machine's cluster on 127.0.0.1:5432.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

/// The tests' PostgreSQL, a superuser's URI (trust auth): `PGWS_TEST_DB_URI` (set by
/// `scripts/test.sh` to its own cluster), or the machine's cluster on 127.0.0.1:5432.
pub fn db_uri() -> String {
    std::env::var("PGWS_TEST_DB_URI")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The TCP host and port of [`db_uri`]'s server (the first, when it names several; port
/// 5432 when it names none). Panics when it names none over TCP (a Unix socket only).
pub fn db_addr() -> (String, u16) {
    let uri = db_uri();
    let config: tokio_postgres::Config = uri
        .parse()
        .unwrap_or_else(|e| panic!("PGWS_TEST_DB_URI is not a connection string ({e})"));
    let host = config
        .get_hosts()
        .iter()
        .find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => Some(name.clone()),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => None,
        })
        .or_else(|| config.get_hostaddrs().first().map(ToString::to_string))
        .unwrap_or_else(|| panic!("the test PostgreSQL ({uri}) is not reached over TCP"));
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host, port)
}

/// The machine's NATS (override with `PGWS_TEST_NATS_URL`).
pub fn nats_url() -> String {
    std::env::var("PGWS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// `prefix` and a suffix of lower-case hex digits no other test (or earlier run) uses: a valid
/// database, channel or NATS subject token when `prefix` is.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:08x}{n:x}", rand::random::<u32>())
}

/// A client of `uri` whose connection a task of the test's runtime drives.
pub async fn connect(uri: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(uri, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A session of `uri` LISTENing on `channels`; each notification arrives as (channel, payload,
/// backend pid), in order.
pub async fn listen(
    uri: &str,
    channels: &[&str],
) -> Result<(Client, mpsc::UnboundedReceiver<(String, String, i32)>), tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(uri, NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let item = (
                    n.channel().to_owned(),
                    n.payload().to_owned(),
                    n.process_id(),
                );
                if tx.send(item).is_err() {
                    break;
                }
            }
        }
    });
    for c in channels {
        client
            .batch_execute(&format!("LISTEN \"{}\"", c.replace('"', "\"\"")))
            .await?;
    }
    Ok((client, rx))
}

/// Polls `check` every 50 ms until it holds (true) or `timeout` passes (false).
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database of the test's own on the machine's PostgreSQL (advisory locks, schemas and
/// slots are per database), dropped with its sessions and inactive replication slots when
/// this is dropped.
pub struct TempDb {
    pub name: String,
    /// Its connection URI.
    pub uri: String,
}

impl TempDb {
    /// Creates a database with a random name.
    pub async fn create() -> Result<Self, tokio_postgres::Error> {
        Self::create_with("").await
    }

    /// Creates a database with a random name and `options` (of `CREATE DATABASE ... WITH`,
    /// such as an encoding).
    pub async fn create_with(options: &str) -> Result<Self, tokio_postgres::Error> {
        let name = unique("pgws_test_");
        connect(&db_uri())
            .await?
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await?;
        let uri = with_database(&db_uri(), &name);
        Ok(Self { name, uri })
    }
}

/// `uri` with its database replaced by `name`.
fn with_database(uri: &str, name: &str) -> String {
    let start = uri.find("://").map_or(0, |i| i + 3);
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    let base = match base[start..].find('/') {
        Some(slash) => &base[..start + slash],
        None => base,
    };
    if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    }
}

/// `uri` (`scheme://[user[:password]@]host[:port][/database][?query]`) with its host and port
/// replaced by `host` and `port`.
fn with_host_port(uri: &str, host: &str, port: u16) -> String {
    let start = uri.find("://").map_or(0, |i| i + 3);
    let end = uri[start..]
        .find(['/', '?'])
        .map_or(uri.len(), |i| start + i);
    let authority = &uri[start..end];
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{}{userinfo}{host}:{port}{}", &uri[..start], &uri[end..])
}

impl Drop for TempDb {
    fn drop(&mut self) {
        // Logical replication slots (a table capture's) keep a database from being dropped.
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE database = '{0}' AND NOT active;
             DROP DATABASE IF EXISTS {0} WITH (FORCE)",
            self.name
        );
        off_runtime(async move {
            match connect(&db_uri()).await {
                Ok(client) => {
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("could not drop the test database: {e}");
                    }
                }
                Err(e) => eprintln!("could not drop the test database: {e}"),
            }
        });
    }
}

/// Runs `f` to completion (10 s at most) on a runtime of its own in another thread: from
/// `Drop`, where the test's runtime cannot be awaited.
pub fn off_runtime(f: impl Future<Output = ()> + Send + 'static) {
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

/// A TCP proxy to the tests' PostgreSQL (at [`db_addr`]), to play a database that is down:
/// closed, it takes connections and drops them; [`Proxy::cut`] ends it and every connection
/// through it. [`Proxy::uri`] turns a URI of that server into one through the proxy.
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on `port` (0: any free one) of 127.0.0.1, open or closed.
    pub async fn start(port: u16, open: bool) -> Self {
        let upstream = db_addr();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the proxy binds");
        let port = listener.local_addr().expect("its address").port();
        let open = Arc::new(AtomicBool::new(open));
        let stop = CancellationToken::new();
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
                let (token, upstream) = (token.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
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

    /// `uri` (a URI of the tests' PostgreSQL, such as [`db_uri`] or a [`TempDb`]'s) through
    /// this proxy: its host and port replaced by 127.0.0.1 and the proxy's port.
    pub fn uri(&self, uri: &str) -> String {
        with_host_port(uri, "127.0.0.1", self.port)
    }

    /// Lets connections through from now on.
    pub fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
    }

    /// Closes the listener and cuts every connection.
    pub fn cut(&self) {
        self.stop.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_uris_take_another_database() {
        assert_ne!(unique("a_"), unique("a_"));
        assert!(unique("db_")
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }

    #[test]
    fn uris_go_through_another_host_and_port() {
        assert_eq!(
            with_host_port("postgres://postgres@127.0.0.1:54330/db_1", "127.0.0.1", 7),
            "postgres://postgres@127.0.0.1:7/db_1"
        );
        assert_eq!(
            with_host_port("postgresql://u:p@w@db.example/x?sslmode=disable", "h", 9),
            "postgresql://u:p@w@h:9/x?sslmode=disable"
        );
        assert_eq!(
            with_host_port("postgres://h", "127.0.0.1", 1),
            "postgres://127.0.0.1:1"
        );
        assert_eq!(
            with_host_port("postgres://h:5/?x=1", "127.0.0.1", 1),
            "postgres://127.0.0.1:1/?x=1"
        );
    }
}
