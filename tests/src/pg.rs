//! A private PostgreSQL cluster for tests that restart the database: `initdb` in a temporary
//! directory, run as the `postgres` user on a free port, removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// A running private cluster.
pub struct PrivatePg {
    bin: PathBuf,
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl PrivatePg {
    /// Creates and starts a cluster (trust authentication, user `postgres`).
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL server binaries not found under /usr/lib/postgresql")?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").is_file())
            .context("no initdb")?;
        let dir = std::env::temp_dir().join(crate::unique("pgws-pg-"));
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()?;
        anyhow::ensure!(status.success(), "chown failed");
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let data = dir.join("data");
        let data_s = data.to_string_lossy().into_owned();
        as_postgres(
            &bin,
            "initdb",
            &["-D", &data_s, "-A", "trust", "-U", "postgres", "--no-sync"],
        )?;
        let pg = Self { bin, dir, port };
        pg.start_server()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn start_server(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c wal_level=logical",
            self.port,
            self.dir.to_string_lossy()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        )
    }

    /// Stops the server (fast mode: sessions are terminated).
    pub fn stop(&self) -> anyhow::Result<()> {
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "stop"],
        )
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.start_server()
    }

    /// Its connection URI.
    pub fn uri(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A superuser `user` that must authenticate with `password` (SCRAM-SHA-256, where every
    /// other user is trusted); its connection URI.
    pub fn password_user(&self, user: &str, password: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &self.uri(), "-c"])
            .arg(format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'"
            ))
            .output()
            .context("running psql")?;
        anyhow::ensure!(
            out.status.success(),
            "creating {user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hba = self.dir.join("data").join("pg_hba.conf");
        let trusted = std::fs::read_to_string(&hba)?;
        std::fs::write(
            &hba,
            format!("host all {user} 127.0.0.1/32 scram-sha-256\n{trusted}"),
        )?;
        as_postgres(&self.bin, "pg_ctl", &["-D", &self.data(), "reload"])?;
        Ok(format!(
            "postgres://{user}:{password}@127.0.0.1:{}/postgres",
            self.port
        ))
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        drop(as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "stop"],
        ));
        drop(std::fs::remove_dir_all(&self.dir));
    }
}
