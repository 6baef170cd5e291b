//! Every setting the stack knows, as typed constants: code reads a setting through its
//! [`Key`], so a misspelled name does not compile, and [`KNOWN_KEYS`] is the one list of them
//! (unknown `PGWS_*` variables are reported as warnings; the deploy tests check every sample
//! file against it).

use std::fmt;

/// A setting's name: lower case, without the `PGWS_` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(&'static str);

impl Key {
    /// `db_uri`.
    pub const fn name(self) -> &'static str {
        self.0
    }

    /// `PGWS_DB_URI`.
    pub fn env(self) -> String {
        format!("PGWS_{}", self.0.to_ascii_uppercase())
    }
}

impl fmt::Display for Key {
    /// As the environment variable (`PGWS_DB_URI`), the name users write.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PGWS_{}", self.0.to_ascii_uppercase())
    }
}

/// `PGWS_CONFIG_FILE`.
pub const CONFIG_FILE: Key = Key("config_file");
/// `PGWS_DB_URI`.
pub const DB_URI: Key = Key("db_uri");
/// `PGWS_JWT_SECRET`.
pub const JWT_SECRET: Key = Key("jwt_secret");
/// `PGWS_JWT_SECRET_BASE64`.
pub const JWT_SECRET_BASE64: Key = Key("jwt_secret_base64");
/// `PGWS_HOST`.
pub const HOST: Key = Key("host");
/// `PGWS_PORT`.
pub const PORT: Key = Key("port");
/// `PGWS_LISTEN_CHANNEL`.
pub const LISTEN_CHANNEL: Key = Key("listen_channel");
/// `PGWS_META_CHANNEL`.
pub const META_CHANNEL: Key = Key("meta_channel");
/// `PGWS_ROOT_PATH`.
pub const ROOT_PATH: Key = Key("root_path");
/// `PGWS_CERTIFICATE_FILE`.
pub const CERTIFICATE_FILE: Key = Key("certificate_file");
/// `PGWS_KEY_FILE`.
pub const KEY_FILE: Key = Key("key_file");
/// `PGWS_CHECK_LISTENER_INTERVAL`.
pub const CHECK_LISTENER_INTERVAL: Key = Key("check_listener_interval");
/// `PGWS_POOL_SIZE`.
pub const POOL_SIZE: Key = Key("pool_size");
/// `PGWS_RETRIES`.
pub const RETRIES: Key = Key("retries");
/// `PGWS_NATS_URL`.
pub const NATS_URL: Key = Key("nats_url");
/// `PGWS_NATS_PREFIX`.
pub const NATS_PREFIX: Key = Key("nats_prefix");
/// `PGWS_ADMIN_HOST`.
pub const ADMIN_HOST: Key = Key("admin_host");
/// `PGWS_ADMIN_PORT`.
pub const ADMIN_PORT: Key = Key("admin_port");
/// `PGWS_LOG`.
pub const LOG: Key = Key("log");
/// `PGWS_LOG_FORMAT`.
pub const LOG_FORMAT: Key = Key("log_format");
/// `PGWS_SEND_QUEUE`.
pub const SEND_QUEUE: Key = Key("send_queue");
/// `PGWS_MAX_PENDING`.
pub const MAX_PENDING: Key = Key("max_pending");
/// `PGWS_PING_INTERVAL`.
pub const PING_INTERVAL: Key = Key("ping_interval");
/// `PGWS_NOTIFY_TIMEOUT`.
pub const NOTIFY_TIMEOUT: Key = Key("notify_timeout");
/// `PGWS_BATCH_SIZE`.
pub const BATCH_SIZE: Key = Key("batch_size");
/// `PGWS_AUDIT`.
pub const AUDIT: Key = Key("audit");
/// `PGWS_AUDIT_MAX_BYTES`.
pub const AUDIT_MAX_BYTES: Key = Key("audit_max_bytes");
/// `PGWS_AUDIT_MAX_AGE`.
pub const AUDIT_MAX_AGE: Key = Key("audit_max_age");
/// `PGWS_AUDIT_REPLICAS`.
pub const AUDIT_REPLICAS: Key = Key("audit_replicas");
/// `PGWS_RECORDER_BATCH_SIZE`.
pub const RECORDER_BATCH_SIZE: Key = Key("recorder_batch_size");
/// `PGWS_RECORDER_BATCH_WAIT`.
pub const RECORDER_BATCH_WAIT: Key = Key("recorder_batch_wait");
/// `PGWS_RECORDER_DISPATCHER`.
pub const RECORDER_DISPATCHER: Key = Key("recorder_dispatcher");
/// `PGWS_RECORDER_RETENTION_DAYS`.
pub const RECORDER_RETENTION_DAYS: Key = Key("recorder_retention_days");
/// `PGWS_DIRECT_CHANNELS`.
pub const DIRECT_CHANNELS: Key = Key("direct_channels");
/// `PGWS_AUDIT_CHANNEL`.
pub const AUDIT_CHANNEL: Key = Key("audit_channel");
/// `PGWS_PUBSUB_GRACE`.
pub const PUBSUB_GRACE: Key = Key("pubsub_grace");
/// `PGWS_PUBSUB_KEYS_TABLE`.
pub const PUBSUB_KEYS_TABLE: Key = Key("pubsub_keys_table");
/// `PGWS_HANDSHAKE_TIMEOUT`.
pub const HANDSHAKE_TIMEOUT: Key = Key("handshake_timeout");
/// `PGWS_JWT_LEEWAY`.
pub const JWT_LEEWAY: Key = Key("jwt_leeway");
/// `PGWS_JWT_AUD`.
pub const JWT_AUD: Key = Key("jwt_aud");
/// `PGWS_JWT_ISS`.
pub const JWT_ISS: Key = Key("jwt_iss");
/// `PGWS_MAX_CONNECTIONS_PER_ADDRESS`.
pub const MAX_CONNECTIONS_PER_ADDRESS: Key = Key("max_connections_per_address");
/// `PGWS_ALLOWED_ORIGINS`.
pub const ALLOWED_ORIGINS: Key = Key("allowed_origins");
/// `PGWS_MAX_MESSAGE_RATE`.
pub const MAX_MESSAGE_RATE: Key = Key("max_message_rate");
/// `PGWS_NATS_USER`.
pub const NATS_USER: Key = Key("nats_user");
/// `PGWS_NATS_PASSWORD`.
pub const NATS_PASSWORD: Key = Key("nats_password");
/// `PGWS_NATS_TOKEN`.
pub const NATS_TOKEN: Key = Key("nats_token");
/// `PGWS_NATS_NKEY`.
pub const NATS_NKEY: Key = Key("nats_nkey");
/// `PGWS_NATS_CREDS`.
pub const NATS_CREDS: Key = Key("nats_creds");
/// `PGWS_NATS_TLS`.
pub const NATS_TLS: Key = Key("nats_tls");
/// `PGWS_NATS_TLS_CA`.
pub const NATS_TLS_CA: Key = Key("nats_tls_ca");
/// `PGWS_NATS_TLS_CERT`.
pub const NATS_TLS_CERT: Key = Key("nats_tls_cert");
/// `PGWS_NATS_TLS_KEY`.
pub const NATS_TLS_KEY: Key = Key("nats_tls_key");
/// `PGWS_SEND_QUEUE_BYTES`.
pub const SEND_QUEUE_BYTES: Key = Key("send_queue_bytes");
/// `PGWS_SEND_BUDGET`.
pub const SEND_BUDGET: Key = Key("send_budget");
/// `PGWS_MAX_HANDSHAKES_PER_ADDRESS`.
pub const MAX_HANDSHAKES_PER_ADDRESS: Key = Key("max_handshakes_per_address");
/// `PGWS_NOTIFY_DEDUP`.
pub const NOTIFY_DEDUP: Key = Key("notify_dedup");
/// `PGWS_ADMIN_ROLES`.
pub const ADMIN_ROLES: Key = Key("admin_roles");
/// `PGWS_JWKS_URL`.
pub const JWKS_URL: Key = Key("jwks_url");
/// `PGWS_JWKS_REFRESH`.
pub const JWKS_REFRESH: Key = Key("jwks_refresh");
/// `PGWS_TABLE_TOPICS`.
pub const TABLE_TOPICS: Key = Key("table_topics");
/// `PGWS_CAPTURE_SLOT`.
pub const CAPTURE_SLOT: Key = Key("capture_slot");
/// `PGWS_LIVE_CLASSES`.
pub const LIVE_CLASSES: Key = Key("live_classes");
/// `PGWS_HISTORY_SECONDS`.
pub const HISTORY_SECONDS: Key = Key("history_seconds");
/// `PGWS_HISTORY_MAX_BYTES`.
pub const HISTORY_MAX_BYTES: Key = Key("history_max_bytes");
/// `PGWS_HISTORY_REPLICAS`.
pub const HISTORY_REPLICAS: Key = Key("history_replicas");

/// Every key the stack knows. Others are reported as warnings, so a typo in an env file
/// does not go unnoticed.
pub const KNOWN_KEYS: &[Key] = &[
    CONFIG_FILE,
    DB_URI,
    JWT_SECRET,
    JWT_SECRET_BASE64,
    HOST,
    PORT,
    LISTEN_CHANNEL,
    META_CHANNEL,
    ROOT_PATH,
    CERTIFICATE_FILE,
    KEY_FILE,
    CHECK_LISTENER_INTERVAL,
    POOL_SIZE,
    RETRIES,
    NATS_URL,
    NATS_PREFIX,
    ADMIN_HOST,
    ADMIN_PORT,
    LOG,
    LOG_FORMAT,
    SEND_QUEUE,
    MAX_PENDING,
    PING_INTERVAL,
    NOTIFY_TIMEOUT,
    BATCH_SIZE,
    AUDIT,
    AUDIT_MAX_BYTES,
    AUDIT_MAX_AGE,
    AUDIT_REPLICAS,
    RECORDER_BATCH_SIZE,
    RECORDER_BATCH_WAIT,
    RECORDER_DISPATCHER,
    RECORDER_RETENTION_DAYS,
    DIRECT_CHANNELS,
    AUDIT_CHANNEL,
    PUBSUB_GRACE,
    PUBSUB_KEYS_TABLE,
    HANDSHAKE_TIMEOUT,
    JWT_LEEWAY,
    JWT_AUD,
    JWT_ISS,
    MAX_CONNECTIONS_PER_ADDRESS,
    ALLOWED_ORIGINS,
    MAX_MESSAGE_RATE,
    NATS_USER,
    NATS_PASSWORD,
    NATS_TOKEN,
    NATS_NKEY,
    NATS_CREDS,
    NATS_TLS,
    NATS_TLS_CA,
    NATS_TLS_CERT,
    NATS_TLS_KEY,
    SEND_QUEUE_BYTES,
    SEND_BUDGET,
    MAX_HANDSHAKES_PER_ADDRESS,
    NOTIFY_DEDUP,
    ADMIN_ROLES,
    JWKS_URL,
    JWKS_REFRESH,
    TABLE_TOPICS,
    CAPTURE_SLOT,
    LIVE_CLASSES,
    HISTORY_SECONDS,
    HISTORY_MAX_BYTES,
    HISTORY_REPLICAS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_lower_case_and_match_their_constants() {
        let mut names: Vec<&str> = KNOWN_KEYS.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a key listed twice");
        for k in KNOWN_KEYS {
            assert!(k
                .name()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
        assert_eq!(DB_URI.env(), "PGWS_DB_URI");
        assert_eq!(DB_URI.to_string(), "PGWS_DB_URI");
    }
}
