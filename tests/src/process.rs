//! Starting a service binary, reading the addresses it logs, and killing it on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::ws::http_get;

/// Which binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// `ws-gateway`
    Gateway,
    /// `pg-bridge`
    Bridge,
    /// `pg-recorder`
    Recorder,
    /// `pgws`: the three in one process
    Pgws,
}

impl ServiceKind {
    fn binary(self) -> &'static str {
        match self {
            Self::Gateway => "ws-gateway",
            Self::Bridge => "pg-bridge",
            Self::Recorder => "pg-recorder",
            Self::Pgws => "pgws",
        }
    }
}

/// The path of a workspace binary next to the test executable (`target/<profile>/`).
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/it-xxxx -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    dir.join(name)
}

/// A running service.
pub struct Service {
    /// Which binary.
    pub kind: ServiceKind,
    child: Child,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// Its public listener (gateway).
    pub addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl Service {
    /// Starts `kind` with exactly `env` (plus PATH) and waits for its listeners.
    pub async fn start(kind: ServiceKind, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut child = Self::command(kind, env)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", kind.binary()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("stderr")?;
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let mut svc = Self {
            kind,
            child,
            admin: ([127, 0, 0, 1], 0).into(),
            addr: None,
            log,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = svc.log();
            let admin = find_addr(&text, "admin listening");
            let public = find_addr(&text, "websocket listening");
            if let Some(admin) = admin {
                let serves_sockets = matches!(kind, ServiceKind::Gateway | ServiceKind::Pgws);
                if !serves_sockets || public.is_some() {
                    svc.admin = admin;
                    svc.addr = public;
                    return Ok(svc);
                }
            }
            if let Ok(Some(status)) = svc.child.try_wait() {
                bail!("{} exited with {status}:\n{text}", kind.binary());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{} did not start:\n{text}", kind.binary());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The command for `kind` with exactly `env` (plus PATH).
    pub fn command(kind: ServiceKind, env: &[(String, String)]) -> Command {
        let path = binary_path(kind.binary());
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "PGWS_LOG",
                "info,pg_bridge=debug,ws_gateway=debug,pgws=debug",
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Everything the service logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{} never became ready:\n{}", self.kind.binary(), self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, ...).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("already exited")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("did not exit in time")?
            .context("wait")
    }

    /// The value of metric sample `name` (exact line prefix, labels included), if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.admin, "/metrics").await.ok()?;
        body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok())?
        })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::env::var_os("TEST_LOG").is_some() {
            eprintln!("---- {} log ----\n{}", self.kind.binary(), self.log());
        }
    }
}

fn find_addr(log: &str, marker: &str) -> Option<SocketAddr> {
    log.lines().filter(|l| l.contains(marker)).find_map(|l| {
        let start = l.find("addr=")? + 5;
        let rest = &l[start..];
        let end = rest.find(' ').unwrap_or(rest.len());
        rest[..end].trim_matches('"').parse().ok()
    })
}
