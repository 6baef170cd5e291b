//! The harness for the end-to-end tests: starts the real service binaries against the real
//! PostgreSQL and NATS of the machine, each test in its own namespace (a random NATS prefix and
//! PostgreSQL listen channel), and drives them with real websocket clients.
//!
//! The binaries are those of `cargo build --workspace` in the same target directory as the
//! test executable. `TEST_LOG=1` prints the services' logs when a test ends.

mod nats;
mod pg;
mod process;
mod ws;

use std::time::Duration;

use anyhow::{bail, Context};
pub use nats::{NatsCluster, NatsSite, PrivateNats};
pub use pg::PrivatePg;
pub use pgws_testkit::{db_uri, eventually, nats_url, unique, TempDb};
pub use process::{binary_path, Service, ServiceKind};
use serde_json::Value;
pub use tokio_tungstenite::tungstenite::Message as Frame;
pub use ws::{http_get, WsClient};

/// The HMAC secret the test stacks use.
pub const SECRET: &str = "reallyreallyreallyreallyverysafe";

/// Unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Signs `claims` with HS256 and [`SECRET`].
pub fn token(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

/// A connected PostgreSQL client (its connection driven in the background).
pub async fn pg() -> anyhow::Result<tokio_postgres::Client> {
    pgws_testkit::connect(&db_uri())
        .await
        .context("connecting to PostgreSQL")
}

/// A session LISTENing on `channels`; each notification arrives as (channel, payload, backend
/// pid), in order.
pub async fn listen(
    channels: &[&str],
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String, i32)>,
)> {
    pgws_testkit::listen(&db_uri(), channels)
        .await
        .context("LISTEN on the machine's PostgreSQL")
}

/// How a stack's roles run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// The three service binaries over NATS.
    Split,
    /// `pgws` processes: without NATS (one node, the in-process bus), or over NATS when the
    /// stack's settings name it ([`Stack::over_nats`]).
    One,
}

/// One stack: its own NATS prefix and listen channel, with gateways and bridges added as the
/// test needs them (in the [`Topology::One`] shape, `pgws` nodes, kept in `gateways`).
/// Processes are killed when the stack is dropped.
pub struct Stack {
    /// How the roles run.
    pub topology: Topology,
    /// `pgws` nodes talk over NATS (`PGWS_NATS_URL` is in their settings).
    pub over_nats: bool,
    /// `PGWS_NATS_PREFIX`.
    pub prefix: String,
    /// `PGWS_LISTEN_CHANNEL`.
    pub listen_channel: String,
    /// Extra settings for every service.
    pub extra: Vec<(String, String)>,
    /// Started gateways.
    pub gateways: Vec<Service>,
    /// Started bridges.
    pub bridges: Vec<Service>,
}

impl Stack {
    /// An empty stack with fresh names.
    pub fn new() -> Self {
        Self {
            topology: Topology::Split,
            over_nats: true,
            prefix: unique("t"),
            listen_channel: unique("listen-"),
            extra: Vec::new(),
            gateways: Vec::new(),
            bridges: Vec::new(),
        }
    }

    /// A stack with one bridge and one gateway, delivering end to end.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// Like [`Stack::start`] with extra settings for every service.
    pub async fn start_with(extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let stack = Self::start_sized(extra, 1, 1).await?;
        stack.wait_flowing(0).await?;
        Ok(stack)
    }

    /// One `pgws` process without NATS (`extra` settings added), delivering end to end.
    pub async fn start_one(extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut stack = Self::new();
        stack.topology = Topology::One;
        stack.over_nats = false;
        stack.extra = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        stack.add_gateway(&[]).await?;
        stack.wait_flowing(0).await?;
        Ok(stack)
    }

    /// A stack of `topology` (one `pgws` without NATS, or a bridge and a gateway) with `extra`
    /// settings, delivering end to end.
    pub async fn start_as(topology: Topology, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        match topology {
            Topology::Split => Self::start_with(extra).await,
            Topology::One => Self::start_one(extra).await,
        }
    }

    /// `bridges` bridges, then `gateways` gateways, each ready, with `extra` settings for every
    /// service; without the delivery probe of [`Stack::start`] (callers that need one wait in
    /// their own way).
    pub async fn start_sized(
        extra: &[(&str, &str)],
        bridges: usize,
        gateways: usize,
    ) -> anyhow::Result<Self> {
        let mut stack = Self::new();
        stack.extra = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for _ in 0..bridges {
            stack.add_bridge(&[]).await?;
        }
        for _ in 0..gateways {
            stack.add_gateway(&[]).await?;
        }
        Ok(stack)
    }

    /// The settings every service of this stack gets.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("PGWS_DB_URI", db_uri()),
            ("PGWS_JWT_SECRET", SECRET.to_owned()),
            ("PGWS_NATS_URL", nats_url()),
            ("PGWS_NATS_PREFIX", self.prefix.clone()),
            ("PGWS_LISTEN_CHANNEL", self.listen_channel.clone()),
            ("PGWS_HOST", "127.0.0.1".to_owned()),
            ("PGWS_PORT", "0".to_owned()),
            ("PGWS_ADMIN_PORT", "0".to_owned()),
            ("PGWS_POOL_SIZE", "2".to_owned()),
            ("PGWS_RETRIES", "2".to_owned()),
            ("PGWS_CHECK_LISTENER_INTERVAL", "500".to_owned()),
            // JetStream reserves a stream's byte limit up front: test stacks keep it small.
            ("PGWS_AUDIT_MAX_BYTES", (16 << 20).to_string()),
            ("PGWS_HISTORY_MAX_BYTES", (16 << 20).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(self.extra.iter().cloned());
        if !self.over_nats {
            env.retain(|(k, _)| k != "PGWS_NATS_URL");
        }
        env
    }

    fn env_with(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env
    }

    /// Starts a gateway (a `pgws` node in the [`Topology::One`] shape) and waits until it
    /// listens and is ready.
    pub async fn add_gateway(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<usize> {
        sweep_stale_streams().await;
        let kind = match self.topology {
            Topology::Split => ServiceKind::Gateway,
            Topology::One => ServiceKind::Pgws,
        };
        let svc = Service::start(kind, &self.env_with(extra)).await?;
        svc.wait_ready().await?;
        self.gateways.push(svc);
        Ok(self.gateways.len() - 1)
    }

    /// Starts a bridge and waits until it is ready.
    pub async fn add_bridge(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<usize> {
        let svc = Service::start(ServiceKind::Bridge, &self.env_with(extra)).await?;
        svc.wait_ready().await?;
        self.bridges.push(svc);
        Ok(self.bridges.len() - 1)
    }

    /// `ws://` base URL of gateway `i`.
    pub fn ws_url(&self, i: usize) -> String {
        format!(
            "ws://{}",
            self.gateways[i]
                .addr
                .unwrap_or_else(|| ([127, 0, 0, 1], 0).into())
        )
    }

    /// Opens `/<channel>/<token>` on gateway `i`.
    pub async fn connect(
        &self,
        i: usize,
        channel: &str,
        claims: &Value,
    ) -> anyhow::Result<WsClient> {
        WsClient::connect(&format!("{}/{}/{}", self.ws_url(i), channel, token(claims))).await
    }

    /// The stack's database URI (`PGWS_DB_URI` of its settings).
    pub fn db_uri(&self) -> String {
        self.env()
            .into_iter()
            .rev()
            .find(|(k, _)| k == "PGWS_DB_URI")
            .map(|(_, v)| v)
            .unwrap_or_else(db_uri)
    }

    /// A client of the stack's database.
    pub async fn pg(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db_uri(), tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// `SELECT pg_notify(listen_channel, payload)`.
    pub async fn notify(&self, db: &tokio_postgres::Client, payload: &str) -> anyhow::Result<()> {
        db.execute(
            "SELECT pg_notify($1, $2)",
            &[&self.listen_channel, &payload],
        )
        .await
        .context("pg_notify")?;
        Ok(())
    }

    /// The index of the bridge that leads (holds LISTEN), if one does.
    pub async fn leader(&self) -> Option<usize> {
        for (i, bridge) in self.bridges.iter().enumerate() {
            if bridge.metric("pgws_bridge_leader").await == Some(1.0) {
                return Some(i);
            }
        }
        None
    }

    /// Waits until a NOTIFY on the listen channel reaches a socket of gateway `i` (a bridge
    /// holds LISTEN and the gateway subscribes).
    pub async fn wait_flowing(&self, i: usize) -> anyhow::Result<()> {
        let probe = unique("probe-");
        let mut ws = self
            .connect(i, &probe, &serde_json::json!({"mode": "r"}))
            .await?;
        let db = self.pg().await?;
        let payload = serde_json::json!({"channel": probe, "payload": "probe"}).to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            self.notify(&db, &payload).await?;
            if ws.next_text(Duration::from_millis(300)).await.is_ok() {
                return Ok(());
            }
        }
        bail!("notifications never reached the gateway")
    }
}

impl Default for Stack {
    fn default() -> Self {
        Self::new()
    }
}

/// `VmHWM` (peak resident set) and `VmRSS` of process `pid`, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// One connection of a kernel TCP table (`/proc/net/tcp`, `tcp6`).
struct TcpEntry {
    local_port: u16,
    remote_port: u16,
    /// The state as the kernel numbers it.
    state: usize,
    /// Bytes sent but not acknowledged or not yet sent.
    unsent: u64,
    inode: String,
}

/// The connections of the TCP tables under `dir` (`/proc/net`, `/proc/<pid>/net`).
fn tcp_entries(dir: &str) -> Vec<TcpEntry> {
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("{dir}/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(queues), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(4), f.get(9))
            else {
                continue;
            };
            let (Some(local_port), Some(remote_port), Ok(state)) =
                (port(local), port(remote), usize::from_str_radix(state, 16))
            else {
                continue;
            };
            let unsent = queues
                .split(':')
                .next()
                .and_then(|q| u64::from_str_radix(q, 16).ok())
                .unwrap_or(0);
            found.push(TcpEntry {
                local_port,
                remote_port,
                state,
                unsent,
                inode: (*inode).to_owned(),
            });
        }
    }
    found
}

/// The kernel's TCP connections on local port `port` (listeners left out), as
/// `/proc/net/tcp` and `tcp6` show them: `(state, bytes sent but not acknowledged or not yet
/// sent)` each, the state as the kernel names it (`ESTABLISHED`, `FIN_WAIT1`, ...).
pub fn tcp_connections(port: u16) -> Vec<(&'static str, u64)> {
    const STATES: [&str; 12] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    tcp_entries("/proc/net")
        .into_iter()
        .map(|e| {
            (
                e.local_port,
                STATES.get(e.state).copied().unwrap_or("?"),
                e.unsent,
            )
        })
        .filter(|(local, state, _)| *local == port && *state != "LISTEN")
        .map(|(_, state, unsent)| (state, unsent))
        .collect()
}

/// The remote ports of the TCP connections process `pid` holds (its socket inodes, from
/// `/proc/<pid>/fd`, matched against its network namespace's TCP tables).
pub fn remote_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    tcp_entries(&format!("/proc/{pid}/net"))
        .into_iter()
        .filter(|e| inodes.contains(&e.inode))
        .map(|e| e.remote_port)
        .collect()
}

/// Test stacks' audit and history streams live on the shared NATS server: delete those left by runs that
/// ended more than ten minutes ago (once per test process).
async fn sweep_stale_streams() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let Ok(client) = async_nats::connect(nats_url()).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            let mut names = js.stream_names();
            let mut stale = Vec::new();
            while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
                let is_test = name.starts_with('t')
                    && ((name.len() == "t00000000-audit".len() && name.ends_with("-audit"))
                        || (name.len() == "t00000000-history".len() && name.ends_with("-history")));
                if is_test {
                    stale.push(name);
                }
            }
            let cutoff = time::OffsetDateTime::now_utc() - time::Duration::minutes(10);
            for name in stale {
                if let Ok(mut stream) = js.get_stream(&name).await {
                    if let Ok(info) = stream.info().await {
                        if info.created < cutoff {
                            drop(js.delete_stream(&name).await);
                        }
                    }
                }
            }
        })
        .await;
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl {args:?} failed");
    Ok(())
}

/// A new folder (`prefix` and a unique suffix, under the temporary directory) with a test CA
/// (`ca.pem`, `ca.key`) and a certificate signed by it for `san` (`leaf.pem`, `leaf.key`),
/// `san` as openssl's subjectAltName spells it (`DNS:localhost`, `IP:127.0.0.1`). openssl
/// makes them.
pub fn test_certificates(prefix: &str, san: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("leaf.ext"),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
    )?;
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=pgws test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    )?;
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=pgws test server",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
        ],
    )?;
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ],
    )?;
    Ok(dir)
}
