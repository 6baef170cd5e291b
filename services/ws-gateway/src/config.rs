//! The gateway's configuration, validated at start with every problem listed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgws_auth::{Authorizer, KeySet, Policy};
use pgws_config::{
    keys, AdminConfig, AuditConfig, ConfigError, HistoryConfig, NatsConfig, Problems, Settings,
};
use pgws_proto::{DEFAULT_LISTEN_CHANNEL, MAX_PG_CHANNEL};

use crate::jwks::JwksConfig;
use crate::limits::Origins;
use crate::listen::ListenAddr;
use crate::DirectChannels;

/// Everything the gateway needs; built by [`GatewayConfig::from_settings`].
#[derive(Clone)]
pub struct GatewayConfig {
    /// Websocket and static-file listener (`PGWS_HOST`, `PGWS_PORT`).
    pub listen: ListenAddr,
    /// Token validation (`PGWS_JWT_SECRET`, `PGWS_JWT_SECRET_BASE64`, or the keys of
    /// `PGWS_JWKS_URL`; `PGWS_JWT_LEEWAY`, `PGWS_JWT_AUD`, `PGWS_JWT_ISS`).
    pub authorizer: Arc<Authorizer>,
    /// Where the keys come from when they are fetched (`PGWS_JWKS_URL`, `PGWS_JWKS_REFRESH`);
    /// none with `PGWS_JWT_SECRET`.
    pub jwks: Option<JwksConfig>,
    /// The PostgreSQL channel client messages are notified on (`PGWS_LISTEN_CHANNEL`).
    pub listen_channel: String,
    /// Where connection events go (`PGWS_META_CHANNEL`); none when unset.
    pub meta_channel: Option<String>,
    /// Channels served as postgrest-ws direct channels (`PGWS_DIRECT_CHANNELS`).
    pub direct: DirectChannels,
    /// Where every client message that makes a NOTIFY is also NOTIFYed, in the same
    /// transaction (`PGWS_AUDIT_CHANNEL`); none when unset.
    pub audit_channel: Option<String>,
    /// Static files for non-websocket requests (`PGWS_ROOT_PATH`).
    pub root_path: Option<PathBuf>,
    /// Certificate and key files (`PGWS_CERTIFICATE_FILE`, `PGWS_KEY_FILE`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// NATS URL and subjects.
    pub nats: NatsConfig,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin: AdminConfig,
    /// The audit stream (`PGWS_AUDIT*`).
    pub audit: AuditConfig,
    /// The history resuming sockets are served from (`PGWS_HISTORY_*`).
    pub history: HistoryConfig,
    /// Messages queued for one socket before it counts as a slow consumer and is
    /// disconnected (`PGWS_SEND_QUEUE`).
    pub send_queue: usize,
    /// Bytes queued for one socket before it counts as a slow consumer
    /// (`PGWS_SEND_QUEUE_BYTES`).
    pub send_queue_bytes: usize,
    /// Bytes queued for all sockets of the gateway together (`PGWS_SEND_BUDGET`); at the
    /// budget a socket with a backlog is disconnected instead of queueing more.
    pub send_budget: usize,
    /// Client frames a socket may have waiting for the database before the gateway stops
    /// reading from it (`PGWS_MAX_PENDING`): back-pressure, never unbounded memory.
    pub max_pending: usize,
    /// Ping period; a peer silent for two periods is dropped (`PGWS_PING_INTERVAL`, seconds).
    pub ping_interval: Duration,
    /// How long a client message may wait for a bridge before the client gets an error
    /// (`PGWS_NOTIFY_TIMEOUT`, seconds).
    pub notify_timeout: Duration,
    /// How long a connection may take for its TLS handshake, its request headers, and its
    /// websocket handshake each (`PGWS_HANDSHAKE_TIMEOUT`, seconds).
    pub handshake_timeout: Duration,
    /// Open websockets per source address (`PGWS_MAX_CONNECTIONS_PER_ADDRESS`); none: no limit.
    pub max_connections_per_address: Option<usize>,
    /// Connections per source address still in their handshake (TLS, request headers,
    /// upgrade) (`PGWS_MAX_HANDSHAKES_PER_ADDRESS`); none: no limit. Beyond it a new
    /// connection is closed at once.
    pub max_handshakes_per_address: Option<usize>,
    /// The `Origin`s a browser may connect from (`PGWS_ALLOWED_ORIGINS`); default any.
    pub allowed_origins: Origins,
    /// Messages per second a socket may send, bursts of as many
    /// (`PGWS_MAX_MESSAGE_RATE`); none: no limit.
    pub max_message_rate: Option<u32>,
    /// `/live`: tokens whose `role` claim is one of these are admins (`PGWS_ADMIN_ROLES`,
    /// comma separated; default none).
    pub admin_roles: Vec<String>,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("listen", &self.listen)
            .field("listen_channel", &self.listen_channel)
            .field("meta_channel", &self.meta_channel)
            .finish_non_exhaustive()
    }
}

impl GatewayConfig {
    /// Reads and validates the gateway's settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut p = Problems::new(settings);
        let port: u16 = p.parse_or(keys::PORT, 3000);
        let listen = match p.text(keys::HOST) {
            None => ListenAddr::any_ipv4(port),
            Some(host) => ListenAddr::parse(&host, port).unwrap_or_else(|e| {
                p.push(format!("PGWS_HOST: invalid value {host:?}: {e}"));
                ListenAddr::any_ipv4(port)
            }),
        };
        let base64 = p.flag(keys::JWT_SECRET_BASE64);
        let policy = Policy {
            leeway: p.parse_or(keys::JWT_LEEWAY, 0),
            audience: p.text(keys::JWT_AUD),
            issuer: p.text(keys::JWT_ISS),
        };
        let (authorizer, jwks) = read_keys(&mut p, base64);
        let authorizer = authorizer.map(|a| a.with_policy(policy));
        let listen_channel = p.text_or(keys::LISTEN_CHANNEL, DEFAULT_LISTEN_CHANNEL);
        if listen_channel.is_empty() || listen_channel.len() > MAX_PG_CHANNEL {
            p.push(format!(
                "PGWS_LISTEN_CHANNEL: must be 1 to {MAX_PG_CHANNEL} bytes, got {}",
                listen_channel.len()
            ));
        }
        let meta_channel = p.text(keys::META_CHANNEL);
        let direct = DirectChannels::parse(&p.text_or(keys::DIRECT_CHANNELS, ""));
        let audit_channel = p.text(keys::AUDIT_CHANNEL);
        for c in direct.names().chain(audit_channel.as_deref()) {
            if !pgws_proto::valid_channel(c) {
                p.push(format!(
                    "PGWS_DIRECT_CHANNELS / PGWS_AUDIT_CHANNEL: {c:?} is not a PostgreSQL channel name (1 to {MAX_PG_CHANNEL} bytes)"
                ));
            }
        }
        for reserved in [Some(listen_channel.as_str()), meta_channel.as_deref()]
            .into_iter()
            .flatten()
        {
            if direct.names().any(|c| c == reserved) {
                p.push(format!(
                    "PGWS_DIRECT_CHANNELS: {reserved:?} is the listen or meta channel"
                ));
            }
            if audit_channel.as_deref() == Some(reserved) {
                p.push(format!(
                    "PGWS_AUDIT_CHANNEL: {reserved:?} is the listen or meta channel"
                ));
            }
        }
        if let Some(a) = audit_channel
            .as_deref()
            .filter(|a| direct.names().any(|c| c == *a))
        {
            p.push(format!(
                "PGWS_AUDIT_CHANNEL: {a:?} is also a direct channel"
            ));
        }
        let root_path = p.text(keys::ROOT_PATH).map(PathBuf::from);
        if let Some(root) = &root_path {
            // A missing folder is only a warning (`server::router`): postgres-websockets starts
            // without it, and its `sample-env` names a folder of its own checkout.
            if root.exists() && !root.is_dir() {
                p.push(format!("PGWS_ROOT_PATH: {root:?} is not a directory"));
            }
        }
        let tls = match (p.text(keys::CERTIFICATE_FILE), p.text(keys::KEY_FILE)) {
            (Some(c), Some(k)) => {
                for (name, f) in [("PGWS_CERTIFICATE_FILE", &c), ("PGWS_KEY_FILE", &k)] {
                    if !std::path::Path::new(f).is_file() {
                        p.push(format!("{name}: no such file {f:?}"));
                    }
                }
                Some((PathBuf::from(c), PathBuf::from(k)))
            }
            (None, None) => None,
            (Some(_), None) => {
                p.push("PGWS_CERTIFICATE_FILE is set but PGWS_KEY_FILE is not: TLS needs both");
                None
            }
            (None, Some(_)) => {
                p.push("PGWS_KEY_FILE is set but PGWS_CERTIFICATE_FILE is not: TLS needs both");
                None
            }
        };
        let nats = NatsConfig::read(&mut p);
        let admin = AdminConfig::read_for(&mut p, env!("CARGO_PKG_NAME"));
        let audit = AuditConfig::read(&mut p);
        let history = HistoryConfig::read(&mut p);
        let send_queue: usize = p.parse_or(keys::SEND_QUEUE, 1024);
        let send_queue_bytes: usize = p.parse_or(keys::SEND_QUEUE_BYTES, 4 << 20);
        let send_budget: usize = p.parse_or(keys::SEND_BUDGET, 1 << 30);
        let max_pending: usize = p.parse_or(keys::MAX_PENDING, 256);
        let ping: u64 = p.parse_or(keys::PING_INTERVAL, 30);
        let notify_timeout: u64 = p.parse_or(keys::NOTIFY_TIMEOUT, 10);
        let handshake_timeout: u64 = p.parse_or(keys::HANDSHAKE_TIMEOUT, 10);
        let max_connections_per_address: Option<usize> = p.parse(keys::MAX_CONNECTIONS_PER_ADDRESS);
        let max_message_rate: Option<u32> = p.parse(keys::MAX_MESSAGE_RATE);
        let max_handshakes_per_address: Option<usize> = p.parse(keys::MAX_HANDSHAKES_PER_ADDRESS);
        let allowed_origins = Origins::parse(&p.text_or(keys::ALLOWED_ORIGINS, ""));
        let admin_roles: Vec<String> = p
            .text_or(keys::ADMIN_ROLES, "")
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        for (name, v) in [
            ("PGWS_SEND_QUEUE", send_queue as u64),
            ("PGWS_SEND_QUEUE_BYTES", send_queue_bytes as u64),
            ("PGWS_SEND_BUDGET", send_budget as u64),
            ("PGWS_MAX_PENDING", max_pending as u64),
            ("PGWS_PING_INTERVAL", ping),
            ("PGWS_NOTIFY_TIMEOUT", notify_timeout),
            ("PGWS_HANDSHAKE_TIMEOUT", handshake_timeout),
            (
                "PGWS_MAX_CONNECTIONS_PER_ADDRESS",
                max_connections_per_address.map_or(1, |n| n as u64),
            ),
            (
                "PGWS_MAX_MESSAGE_RATE",
                max_message_rate.map_or(1, u64::from),
            ),
        ] {
            if v == 0 {
                p.push(format!("{name}: must be at least 1"));
            }
        }
        let config = authorizer.map(|a| Self {
            listen,
            authorizer: Arc::new(a),
            jwks,
            listen_channel,
            meta_channel,
            direct,
            audit_channel,
            root_path,
            tls,
            nats,
            admin,
            audit,
            history,
            send_queue,
            send_queue_bytes,
            send_budget,
            max_pending,
            ping_interval: Duration::from_secs(ping),
            notify_timeout: Duration::from_secs(notify_timeout),
            handshake_timeout: Duration::from_secs(handshake_timeout),
            max_connections_per_address,
            max_handshakes_per_address,
            allowed_origins,
            admin_roles,
            max_message_rate,
        });
        match (p.finish(()), config) {
            (Ok(()), Some(c)) => Ok(c),
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(ConfigError {
                problems: vec!["PGWS_JWT_SECRET is invalid".to_owned()],
            }),
        }
    }
}

/// The token keys: `PGWS_JWT_SECRET` (parsed now) or `PGWS_JWKS_URL` (fetched at start),
/// exactly one of them.
fn read_keys(p: &mut Problems<'_>, base64: bool) -> (Option<Authorizer>, Option<JwksConfig>) {
    let refresh: Option<u64> = p.parse(keys::JWKS_REFRESH);
    let Some(url) = p.text(keys::JWKS_URL) else {
        if refresh.is_some() {
            p.push("PGWS_JWKS_REFRESH is set but PGWS_JWKS_URL is not");
        }
        let authorizer = match p.secret(keys::JWT_SECRET) {
            Some(secret) => Authorizer::from_secret(&secret, base64)
                .map_err(|e| p.push(format!("PGWS_JWT_SECRET: {e}")))
                .ok(),
            None => {
                if p.text(keys::JWT_SECRET).is_none() {
                    p.push("PGWS_JWT_SECRET is required (or PGWS_JWKS_URL)");
                }
                None
            }
        };
        return (authorizer, None);
    };
    if p.text(keys::JWT_SECRET).is_some() {
        p.push(
            "PGWS_JWT_SECRET and PGWS_JWKS_URL are both set: the token keys come from one of them",
        );
    }
    if base64 {
        p.push("PGWS_JWT_SECRET_BASE64 is set but the keys come from PGWS_JWKS_URL");
    }
    let refresh = refresh.unwrap_or(300);
    if refresh == 0 {
        p.push("PGWS_JWKS_REFRESH: must be at least 1");
    }
    match JwksConfig::parse_url(&url) {
        Ok(url) => {
            let keys = Arc::new(KeySet::new());
            let authorizer = Authorizer::from_key_set(Arc::clone(&keys));
            let jwks = JwksConfig {
                url,
                refresh: Duration::from_secs(refresh),
                keys,
            };
            (Some(authorizer), Some(jwks))
        }
        Err(e) => {
            p.push(format!("PGWS_JWKS_URL: {e}"));
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported() {
        let s = Settings::from_pairs(&[
            ("PGWS_PORT", "nope"),
            ("PGWS_CERTIFICATE_FILE", "/tmp/cert.pem"),
            ("PGWS_NATS_PREFIX", "a.*"),
        ])
        .expect("settings");
        let e = GatewayConfig::from_settings(&s).expect_err("invalid");
        let text = e.to_string();
        assert!(text.contains("PGWS_PORT"), "{text}");
        assert!(text.contains("PGWS_JWT_SECRET is required"), "{text}");
        assert!(text.contains("TLS needs both"), "{text}");
        assert!(text.contains("PGWS_NATS_PREFIX"), "{text}");
    }

    #[test]
    fn keys_come_from_a_secret_or_a_jwks_url() {
        let problems = |pairs: &[(&str, &str)]| {
            let s = Settings::from_pairs(pairs).expect("settings");
            GatewayConfig::from_settings(&s).map_or_else(|e| e.problems, |_| Vec::new())
        };
        let url = "https://idp.example/.well-known/jwks.json";
        let s = Settings::from_pairs(&[("PGWS_JWKS_URL", url)]).expect("settings");
        let c = GatewayConfig::from_settings(&s).expect("valid");
        let jwks = c.jwks.expect("jwks");
        assert_eq!(jwks.url.as_str(), url);
        assert_eq!(jwks.refresh, Duration::from_secs(300));
        assert!(jwks.keys.is_empty());
        assert_eq!(
            problems(&[("PGWS_JWKS_URL", url), ("PGWS_JWT_SECRET", "s")]),
            ["PGWS_JWT_SECRET and PGWS_JWKS_URL are both set: the token keys come from one of them"]
        );
        assert_eq!(
            problems(&[("PGWS_JWKS_URL", url), ("PGWS_JWT_SECRET_BASE64", "true")]),
            ["PGWS_JWT_SECRET_BASE64 is set but the keys come from PGWS_JWKS_URL"]
        );
        assert_eq!(
            problems(&[("PGWS_JWKS_URL", url), ("PGWS_JWKS_REFRESH", "0")]),
            ["PGWS_JWKS_REFRESH: must be at least 1"]
        );
        assert_eq!(
            problems(&[("PGWS_JWT_SECRET", "s"), ("PGWS_JWKS_REFRESH", "60")]),
            ["PGWS_JWKS_REFRESH is set but PGWS_JWKS_URL is not"]
        );
        let bad = problems(&[("PGWS_JWKS_URL", "ftp://idp.example/jwks")]);
        assert_eq!(bad, ["PGWS_JWKS_URL: scheme \"ftp\": only http and https"]);
        assert_eq!(
            problems(&[]),
            ["PGWS_JWT_SECRET is required (or PGWS_JWKS_URL)"]
        );
    }

    #[test]
    fn defaults_match_postgres_websockets() {
        let s = Settings::from_pairs(&[("PGWS_JWT_SECRET", "reallyreallyreallyreallyverysafe")])
            .expect("settings");
        let c = GatewayConfig::from_settings(&s).expect("valid");
        assert_eq!(c.listen.port(), 3000);
        assert_eq!(c.listen_channel, "postgres-websockets-listener");
        assert!(c.meta_channel.is_none() && c.tls.is_none() && c.root_path.is_none());
        assert_eq!(c.nats.subjects.notify(), "pgws.notify");
        assert!(c.jwks.is_none());
    }
}
