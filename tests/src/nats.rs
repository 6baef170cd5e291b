//! A private NATS server for tests that restart it: `nats-server -js` on a free port with its
//! store in a temporary directory; a restart keeps the port and the store. Killed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// A private `nats-server` with JetStream.
pub struct PrivateNats {
    child: Option<Child>,
    dir: PathBuf,
    /// A configuration file (`-c`), when started with one.
    conf: Option<PathBuf>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").is_file() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

impl PrivateNats {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("").await
    }

    /// Starts a server with `conf` as its configuration file (e.g. an `authorization` block).
    pub async fn start_with(conf: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("pgws-nats-"));
        std::fs::create_dir_all(&dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = if conf.is_empty() {
            None
        } else {
            let path = dir.join("nats.conf");
            std::fs::write(&path, conf)?;
            Some(path)
        };
        let mut nats = Self {
            child: None,
            dir,
            conf,
            port,
        };
        nats.restart().await?;
        Ok(nats)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to exit.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing nats-server")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server (again) on the same port with the same store, and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let mut command = Command::new(binary());
        if let Some(conf) = &self.conf {
            command.arg("-c").arg(conf);
        }
        let child = command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
                bail!("nats-server did not listen on {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        drop(self.kill());
        drop(std::fs::remove_dir_all(&self.dir));
    }
}
