//! Private NATS servers for tests that restart them, configure them or need a cluster:
//! `nats-server -js` on free ports with its store in a temporary directory; a restart keeps the
//! ports and the store. Killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// A private `nats-server` with JetStream.
pub struct PrivateNats {
    child: Option<Child>,
    dir: PathBuf,
    /// A configuration file (`-c`), when started with one.
    conf: Option<PathBuf>,
    /// Flags after the common ones (a cluster's routes).
    args: Vec<String>,
    /// The server's environment (variables its configuration file reads).
    env: Vec<(String, String)>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its monitoring port (`/varz`, `/jsz`, ...) on 127.0.0.1.
    pub monitor_port: u16,
}

/// Where a private server listens and keeps its store, for a configuration file that names
/// them (they are given as flags too).
pub struct NatsSite {
    /// The client port.
    pub port: u16,
    /// The monitoring port.
    pub monitor_port: u16,
    /// The JetStream store directory.
    pub store: PathBuf,
}

/// `PGWS_TEST_NATS_SERVER` (another nats-server build), else Debian's, else `PATH`'s.
fn binary() -> String {
    if let Ok(path) = std::env::var("PGWS_TEST_NATS_SERVER") {
        return path;
    }
    if Path::new("/usr/sbin/nats-server").is_file() {
        "/usr/sbin/nats-server".to_owned()
    } else {
        "nats-server".to_owned()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PrivateNats {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        let mut nats = Self::prepare(Vec::new(), &[])?;
        nats.restart().await?;
        Ok(nats)
    }

    /// Starts a server whose configuration file `conf` writes from the ports and store it was
    /// given (the file must put JetStream's `store_dir` at [`NatsSite::store`]), with `env` as
    /// the server's environment.
    pub async fn start_configured(
        conf: impl FnOnce(&NatsSite) -> String,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut nats = Self::prepare(Vec::new(), env)?;
        let text = conf(&NatsSite {
            port: nats.port,
            monitor_port: nats.monitor_port,
            store: nats.dir.join("store"),
        });
        let path = nats.dir.join("nats.conf");
        std::fs::write(&path, text)?;
        nats.conf = Some(path);
        nats.restart().await?;
        Ok(nats)
    }

    fn prepare(args: Vec<String>, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("pgws-nats-"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            child: None,
            dir,
            conf: None,
            args,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            port: free_port()?,
            monitor_port: free_port()?,
        })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the process runs (it was not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to exit.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing nats-server")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server (again) on the same ports with the same store, and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let mut command = Command::new(binary());
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string(), "-js"]);
        match &self.conf {
            // The file names the store: nats-server refuses it twice.
            Some(conf) => command.arg("-c").arg(conf),
            None => command.arg("-sd").arg(self.dir.join("store")),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "nats-server did not listen on {}:\n{}",
                    self.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A monitoring endpoint's JSON (`/jsz?streams=true`, `/routez`, ...).
    pub async fn monitor(&self, path: &str) -> anyhow::Result<Value> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        let (status, body) = crate::http_get(addr, path).await?;
        anyhow::ensure!(status == 200, "{path}: HTTP {status}");
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        drop(self.kill());
        drop(std::fs::remove_dir_all(&self.dir));
    }
}
/// Private servers routed to each other as one cluster, JetStream on each (clustered
/// JetStream: streams may have replicas on several nodes).
pub struct NatsCluster {
    /// The nodes, named `n0`, `n1`, ... (`server_name`).
    pub nodes: Vec<PrivateNats>,
}

impl NatsCluster {
    /// Starts `n` routed nodes and waits until JetStream has a meta leader.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let name = crate::unique("pgws-");
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut nodes = Vec::with_capacity(n);
        for (i, own) in routes.iter().enumerate() {
            let others: Vec<String> = routes
                .iter()
                .filter(|p| *p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            let args = vec![
                "--server_name".to_owned(),
                format!("n{i}"),
                "--cluster_name".to_owned(),
                name.clone(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{own}"),
                "--routes".to_owned(),
                others.join(","),
            ];
            nodes.push(PrivateNats::prepare(args, &[])?);
        }
        for node in &mut nodes {
            node.restart().await?;
        }
        let cluster = Self { nodes };
        let led = crate::eventually(Duration::from_secs(30), || async {
            cluster.meta_leader().await.is_some()
        })
        .await;
        anyhow::ensure!(led, "the cluster elected no JetStream meta leader");
        Ok(cluster)
    }

    /// Every node's URL, comma separated (as `PGWS_NATS_URL` takes them).
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(PrivateNats::url).collect();
        urls.join(",")
    }

    /// The index of a node by its server name (`n2` -> 2).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        let i: usize = server_name.strip_prefix('n')?.parse().ok()?;
        (i < self.nodes.len()).then_some(i)
    }

    /// The node leading JetStream's meta group, as a running node reports it.
    pub async fn meta_leader(&self) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            if let Ok(jsz) = node.monitor("/jsz").await {
                if let Some(leader) = jsz["meta_cluster"]["leader"].as_str() {
                    return self.index_of(leader);
                }
            }
        }
        None
    }

    /// The node leading `stream`, as a running node reports it.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok(jsz) = node.monitor("/jsz?accounts=true&streams=true").await else {
                continue;
            };
            let accounts = jsz["account_details"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for account in accounts {
                let streams = account["stream_detail"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for s in streams.iter().filter(|s| s["name"] == stream) {
                    if let Some(leader) = s["cluster"]["leader"].as_str() {
                        return self.index_of(leader);
                    }
                }
            }
        }
        None
    }
}
