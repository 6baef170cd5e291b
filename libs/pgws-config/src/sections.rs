//! The configuration sections several services share: NATS, the admin listener, PostgreSQL.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use pgws_proto::{Prefix, Subjects, DEFAULT_PREFIX};

use crate::{keys, Problems};

/// `PGWS_NATS_URL`, `PGWS_NATS_PREFIX`, and how to authenticate (`PGWS_NATS_USER` ...).
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma separated.
    pub url: String,
    /// Every subject, stream and consumer name derives from this.
    pub subjects: Subjects,
    /// Credentials and TLS for the connection.
    pub auth: NatsAuth,
}

/// How a service authenticates to NATS: at most one of user and password, token, NKey seed or
/// credentials file; TLS with an extra root certificate and a client certificate.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// `PGWS_NATS_USER` and `PGWS_NATS_PASSWORD` (`@path` accepted).
    pub user: Option<(String, String)>,
    /// `PGWS_NATS_TOKEN` (`@path` accepted).
    pub token: Option<String>,
    /// `PGWS_NATS_NKEY`: an NKey seed (`@path` accepted).
    pub nkey: Option<String>,
    /// `PGWS_NATS_CREDS`: a `.creds` file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// `PGWS_NATS_TLS`: require TLS (also implied by a `tls://` URL or the files below).
    pub tls: bool,
    /// `PGWS_NATS_TLS_CA`: a root certificate (PEM) to trust besides the system's.
    pub tls_ca: Option<PathBuf>,
    /// `PGWS_NATS_TLS_CERT` and `PGWS_NATS_TLS_KEY`: a client certificate and its key (PEM).
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("token", &self.token.is_some())
            .field("nkey", &self.nkey.is_some())
            .field("creds", &self.creds)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl NatsAuth {
    fn read(p: &mut Problems<'_>) -> Self {
        let user = p.text(keys::NATS_USER);
        let password = p.secret(keys::NATS_PASSWORD);
        let token = p.secret(keys::NATS_TOKEN);
        let nkey = p.secret(keys::NATS_NKEY);
        let creds = p.text(keys::NATS_CREDS).map(PathBuf::from);
        let methods = [
            user.is_some(),
            token.is_some(),
            nkey.is_some(),
            creds.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            p.push("PGWS_NATS_USER, PGWS_NATS_TOKEN, PGWS_NATS_NKEY and PGWS_NATS_CREDS: set at most one");
        }
        let user = match (user, password) {
            (Some(u), Some(pw)) => Some((u, pw)),
            (Some(_), None) => {
                p.push("PGWS_NATS_USER is set but PGWS_NATS_PASSWORD is not");
                None
            }
            (None, Some(_)) => {
                p.push("PGWS_NATS_PASSWORD is set but PGWS_NATS_USER is not");
                None
            }
            (None, None) => None,
        };
        let tls_ca = p.text(keys::NATS_TLS_CA).map(PathBuf::from);
        let tls_client = match (p.text(keys::NATS_TLS_CERT), p.text(keys::NATS_TLS_KEY)) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            _ => {
                p.push("PGWS_NATS_TLS_CERT and PGWS_NATS_TLS_KEY go together");
                None
            }
        };
        let files = creds
            .iter()
            .map(|f| ("PGWS_NATS_CREDS", f))
            .chain(tls_ca.iter().map(|f| ("PGWS_NATS_TLS_CA", f)))
            .chain(
                tls_client
                    .iter()
                    .flat_map(|(c, k)| [("PGWS_NATS_TLS_CERT", c), ("PGWS_NATS_TLS_KEY", k)]),
            );
        let missing: Vec<String> = files
            .filter(|(_, f)| !f.is_file())
            .map(|(name, f)| format!("{name}: no such file {f:?}"))
            .collect();
        for m in missing {
            p.push(m);
        }
        let tls = p.flag(keys::NATS_TLS) || tls_ca.is_some() || tls_client.is_some();
        Self {
            user,
            token,
            nkey,
            creds,
            tls,
            tls_ca,
            tls_client,
        }
    }
}

impl NatsConfig {
    /// Reads the section.
    pub fn read(p: &mut Problems<'_>) -> Self {
        let url = p.text_or(keys::NATS_URL, "nats://127.0.0.1:4222");
        let prefix = p.text_or(keys::NATS_PREFIX, DEFAULT_PREFIX);
        let prefix = match Prefix::new(&prefix) {
            Ok(prefix) => prefix,
            Err(e) => {
                p.push(format!("PGWS_NATS_PREFIX: {e}"));
                Prefix::new(DEFAULT_PREFIX).unwrap_or_else(|_| unreachable!("default is valid"))
            }
        };
        let auth = NatsAuth::read(p);
        Self {
            url,
            subjects: Subjects::new(prefix),
            auth,
        }
    }
}

/// `PGWS_ADMIN_HOST`, `PGWS_ADMIN_PORT`: where `/healthz`, `/readyz` and `/metrics` are served.
#[derive(Debug, Clone, Copy)]
pub struct AdminConfig {
    /// Listen address.
    pub addr: SocketAddr,
}

/// Each service's default admin port (`PGWS_ADMIN_PORT`), by package: its own, so a whole
/// stack can run on one host without settings.
pub const DEFAULT_ADMIN_PORTS: [(&str, u16); 3] = [
    ("ws-gateway", 9100),
    ("pg-bridge", 9101),
    ("pg-recorder", 9102),
];

impl AdminConfig {
    /// The default admin port of the service `package` ([`DEFAULT_ADMIN_PORTS`]).
    pub fn default_port(package: &str) -> Option<u16> {
        DEFAULT_ADMIN_PORTS
            .iter()
            .find(|(p, _)| *p == package)
            .map(|(_, port)| *port)
    }

    /// Reads the section of the service `package`, whose default port is its own.
    pub fn read_for(p: &mut Problems<'_>, package: &str) -> Self {
        Self::read(p, Self::default_port(package).unwrap_or(9100))
    }

    /// Reads the section with `default_port` when `PGWS_ADMIN_PORT` is unset.
    pub fn read(p: &mut Problems<'_>, default_port: u16) -> Self {
        let host: IpAddr = p.parse_or(keys::ADMIN_HOST, IpAddr::from([127, 0, 0, 1]));
        let port: u16 = p.parse_or(keys::ADMIN_PORT, default_port);
        Self {
            addr: SocketAddr::new(host, port),
        }
    }
}

/// `PGWS_DB_URI`, `PGWS_RETRIES`: the database, for the services that may talk to it.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// A libpq-style URI or key=value string.
    pub uri: String,
    /// Connection attempts at start (1 s doubling, capped at 32 s).
    pub retries: u32,
}

impl DbConfig {
    /// Reads the section; `PGWS_DB_URI` is required (`@path` reads it from a file).
    pub fn read(p: &mut Problems<'_>) -> Self {
        let uri = match p.secret(keys::DB_URI) {
            Some(uri) => uri,
            None => {
                if p.text(keys::DB_URI).is_none() {
                    p.push("PGWS_DB_URI is required");
                }
                String::new()
            }
        };
        let retries = p.parse_or(keys::RETRIES, 5);
        Self { uri, retries }
    }

    /// The delay before attempt `n` (0-based) after a failure: 1 s doubling, capped at 32 s.
    pub fn backoff(attempt: u32) -> Duration {
        Duration::from_secs(1u64 << attempt.min(5))
    }
}

/// `PGWS_AUDIT*`: the JetStream stream that captures every accepted client message for
/// pg-recorder. It is a work queue: a record leaves it once a recorder committed it, so its
/// limits bound how far the recorders may fall behind. When it is full, new client messages are
/// refused with an error frame rather than accepted unrecorded.
#[derive(Debug, Clone, Copy)]
pub struct AuditConfig {
    /// `PGWS_AUDIT` (default true): gateways publish audit records.
    pub enabled: bool,
    /// `PGWS_AUDIT_MAX_BYTES` (default 1 GiB) of records not yet recorded.
    pub max_bytes: i64,
    /// `PGWS_AUDIT_MAX_AGE` (seconds, default 7 days): older unrecorded records are dropped.
    pub max_age: Duration,
    /// `PGWS_AUDIT_REPLICAS` (default 1; 3 on a NATS cluster).
    pub replicas: usize,
}

impl AuditConfig {
    /// Reads the section.
    pub fn read(p: &mut Problems<'_>) -> Self {
        let enabled = p.text(keys::AUDIT).is_none() || p.flag(keys::AUDIT);
        let max_bytes: i64 = p.parse_or(keys::AUDIT_MAX_BYTES, 1 << 30);
        let max_age: u64 = p.parse_or(keys::AUDIT_MAX_AGE, 7 * 24 * 3600);
        let replicas: usize = p.parse_or(keys::AUDIT_REPLICAS, 1);
        if max_bytes < 1 {
            p.push("PGWS_AUDIT_MAX_BYTES: must be positive");
        }
        if !(1..=5).contains(&replicas) {
            p.push("PGWS_AUDIT_REPLICAS: must be 1 to 5");
        }
        Self {
            enabled,
            max_bytes,
            max_age: Duration::from_secs(max_age),
            replicas,
        }
    }
}

/// The history of delivered messages that resuming sockets are served from: on NATS a
/// JetStream stream, in one process memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// `PGWS_HISTORY_SECONDS` (default 300): how long a delivered message is kept; 0 keeps
    /// none (no history: `?resume` is refused).
    pub max_age: Duration,
    /// `PGWS_HISTORY_MAX_BYTES` (default 256 MiB) for the whole stack: the oldest messages go
    /// first beyond it.
    pub max_bytes: i64,
    /// `PGWS_HISTORY_REPLICAS` (default 1; 3 on a NATS cluster).
    pub replicas: usize,
}

impl HistoryConfig {
    /// Reads the section.
    pub fn read(p: &mut Problems<'_>) -> Self {
        let seconds: u64 = p.parse_or(keys::HISTORY_SECONDS, 300);
        let max_bytes: i64 = p.parse_or(keys::HISTORY_MAX_BYTES, 256 << 20);
        let replicas: usize = p.parse_or(keys::HISTORY_REPLICAS, 1);
        if max_bytes < 1 {
            p.push("PGWS_HISTORY_MAX_BYTES: must be positive");
        }
        if !(1..=5).contains(&replicas) {
            p.push("PGWS_HISTORY_REPLICAS: must be 1 to 5");
        }
        Self {
            max_age: Duration::from_secs(seconds),
            max_bytes,
            replicas,
        }
    }

    /// Whether messages are kept at all.
    pub fn enabled(&self) -> bool {
        !self.max_age.is_zero()
    }
}
