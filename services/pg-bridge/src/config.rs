//! The bridge's configuration, composed from the shared sections and validated at start.
//!
//! Every problem is collected through [`Problems`] so a bad env file is reported in one go,
//! never at first use. The `PGWS_*` names keep their postgres-websockets meaning.

use std::time::Duration;

use pgws_config::keys;
use pgws_config::{
    AdminConfig, ConfigError, DbConfig, DirectChannels, HistoryConfig, NatsConfig, Problems,
    Settings,
};
use pgws_proto::{DEFAULT_LISTEN_CHANNEL, MAX_PG_CHANNEL};

/// Default `PGWS_POOL_SIZE`, as in postgres-websockets.
pub const DEFAULT_POOL_SIZE: usize = 10;
/// Upper bound of `PGWS_POOL_SIZE`: each worker holds one PostgreSQL connection.
pub const MAX_POOL_SIZE: usize = 100;
/// Default `PGWS_BATCH_SIZE`.
pub const DEFAULT_BATCH_SIZE: usize = 1000;

/// Everything pg-bridge needs to run.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// `PGWS_DB_URI` (required, `@path` accepted) and `PGWS_RETRIES`.
    pub db: DbConfig,
    /// `PGWS_NATS_URL`, `PGWS_NATS_PREFIX`.
    pub nats: NatsConfig,
    /// `PGWS_ADMIN_HOST`, `PGWS_ADMIN_PORT` (default 9101).
    pub admin: AdminConfig,
    /// `PGWS_LISTEN_CHANNEL`: the PostgreSQL channel the leader LISTENs on (1..=63 bytes).
    pub listen_channel: String,
    /// `PGWS_CHECK_LISTENER_INTERVAL` (milliseconds): how often the leader probes its LISTEN
    /// connection with `SELECT 1`, the probe timing out after the same interval.
    pub check_listener_interval: Option<Duration>,
    /// `PGWS_POOL_SIZE`: NOTIFY worker connections (1..=100).
    pub pool_size: usize,
    /// `PGWS_BATCH_SIZE`: most notifications gathered into one batch (>= 1); a single request
    /// larger than this is still executed whole, alone in its batch.
    pub batch_size: usize,
    /// `PGWS_PUBSUB_GRACE` (seconds, default 10): how long a wspubsub topic whose publisher
    /// left waits for a new one before its subscribers are closed.
    pub pubsub_grace: Duration,
    /// `PGWS_PUBSUB_KEYS_TABLE` (default `apikeys`, may be `schema.table`): where wspubsub
    /// API keys are checked.
    pub pubsub_keys_table: String,
    /// `PGWS_NOTIFY_DEDUP` (default true): execute each NOTIFY request id at most once, with
    /// the keys in `pgws_bridge.notify_requests`; false gives at-least-once toward PostgreSQL
    /// (a retried request may be NOTIFYed twice) and needs no table.
    pub notify_dedup: bool,
    /// `PGWS_DIRECT_CHANNELS`: the channels the leader LISTENs on when a gateway reports a
    /// socket on one (the gateways' setting; any other channel a report names is refused).
    pub direct_channels: DirectChannels,
    /// `PGWS_TABLE_TOPICS`: the tables whose committed changes `/live` sockets may read.
    pub table_topics: Vec<TablePattern>,
    /// `PGWS_CAPTURE_SLOT`: the logical replication slot (and publication) of the capture.
    pub capture_slot: String,
    /// `PGWS_LIVE_CLASSES`: `policy` (default) or `subscriber` (one class per socket: the
    /// baseline of the benchmark, never for production).
    pub class_per_subscriber: bool,
    /// `PGWS_HISTORY_*`: the history stream the bridges keep up (on NATS).
    pub history: HistoryConfig,
}

/// One entry of `PGWS_TABLE_TOPICS`: `schema.table`, or `schema.*` for every table of a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    pub schema: String,
    /// `None` for `*`.
    pub table: Option<String>,
}

impl TablePattern {
    /// Reads one entry; a bare `table` means `public.table`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let (schema, table) = entry.split_once('.').unwrap_or(("public", entry));
        if entry == "*" {
            return Err("\"*\" alone: name the schema, schema.*".to_owned());
        }
        let ok = |name: &str| {
            !name.is_empty()
                && name.len() <= pgws_proto::MAX_PG_CHANNEL
                && !name.chars().any(|c| c.is_control() || c == ',')
        };
        if !ok(schema) || !(table == "*" || ok(table)) || table.contains('.') {
            return Err(format!(
                "{entry:?} is not schema.table or schema.* (names of 1 to 63 bytes)"
            ));
        }
        Ok(Self {
            schema: schema.to_owned(),
            table: (table != "*").then(|| table.to_owned()),
        })
    }
}

/// Default `PGWS_PUBSUB_GRACE`, seconds.
pub(crate) const DEFAULT_PUBSUB_GRACE: u64 = 10;

impl BridgeConfig {
    /// Reads and validates the settings, reporting every problem at once.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut p = Problems::new(settings);
        let db = DbConfig::read(&mut p);
        if !db.uri.is_empty() {
            if let Err(e) = crate::db::pg_config(&db.uri) {
                p.push(format!("PGWS_DB_URI: {e}"));
            }
        }
        let nats = NatsConfig::read(&mut p);
        let admin = AdminConfig::read_for(&mut p, env!("CARGO_PKG_NAME"));

        let listen_channel = p.text_or(keys::LISTEN_CHANNEL, DEFAULT_LISTEN_CHANNEL);
        if listen_channel.len() > MAX_PG_CHANNEL {
            p.push(format!(
                "PGWS_LISTEN_CHANNEL: {} bytes, PostgreSQL allows at most {MAX_PG_CHANNEL}",
                listen_channel.len()
            ));
        }
        if listen_channel.contains('\0') {
            p.push("PGWS_LISTEN_CHANNEL: must not contain a NUL character");
        }

        let check_listener_interval = match p.parse::<u64>(keys::CHECK_LISTENER_INTERVAL) {
            Some(0) => {
                p.push("PGWS_CHECK_LISTENER_INTERVAL: must be a positive number of milliseconds");
                None
            }
            Some(ms) => Some(Duration::from_millis(ms)),
            None => None,
        };

        let pool_size = p.parse_or(keys::POOL_SIZE, DEFAULT_POOL_SIZE);
        if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
            p.push(format!(
                "PGWS_POOL_SIZE: {pool_size} is out of range 1..={MAX_POOL_SIZE}"
            ));
        }
        let batch_size = p.parse_or(keys::BATCH_SIZE, DEFAULT_BATCH_SIZE);
        if batch_size == 0 {
            p.push("PGWS_BATCH_SIZE: must be at least 1");
        }

        let grace: u64 = p.parse_or(keys::PUBSUB_GRACE, DEFAULT_PUBSUB_GRACE);
        let pubsub_keys_table = p.text_or(keys::PUBSUB_KEYS_TABLE, "apikeys");
        if pubsub_keys_table.is_empty()
            || pubsub_keys_table.contains('\0')
            || pubsub_keys_table.split('.').any(str::is_empty)
        {
            p.push("PGWS_PUBSUB_KEYS_TABLE: a table name, or schema.table");
        }

        let notify_dedup = p.text(keys::NOTIFY_DEDUP).is_none() || p.flag(keys::NOTIFY_DEDUP);

        let direct_channels = DirectChannels::parse(&p.text_or(keys::DIRECT_CHANNELS, ""));
        for c in direct_channels.names() {
            if !pgws_proto::valid_channel(c) {
                p.push(format!(
                    "PGWS_DIRECT_CHANNELS: {c:?} is not a PostgreSQL channel name (1 to {MAX_PG_CHANNEL} bytes)"
                ));
            }
        }

        let mut table_topics = Vec::new();
        for entry in p
            .text(keys::TABLE_TOPICS)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            match TablePattern::parse(entry) {
                Ok(t) => table_topics.push(t),
                Err(e) => p.push(format!("PGWS_TABLE_TOPICS: {e}")),
            }
        }
        let default_slot = format!(
            "pgws_{}",
            nats.subjects
                .prefix()
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                })
                .collect::<String>()
        );
        let capture_slot = p.text_or(keys::CAPTURE_SLOT, &default_slot);
        if capture_slot.is_empty()
            || capture_slot.len() > pgws_proto::MAX_PG_CHANNEL
            || !capture_slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            p.push(format!(
                "PGWS_CAPTURE_SLOT: {capture_slot:?}: lower-case letters, digits and _, at most 63"
            ));
        }
        let class_per_subscriber = match p.text(keys::LIVE_CLASSES).as_deref() {
            None | Some("policy") => false,
            Some("subscriber") => true,
            Some(other) => {
                p.push(format!(
                    "PGWS_LIVE_CLASSES: {other:?} is neither policy nor subscriber"
                ));
                false
            }
        };
        let history = HistoryConfig::read(&mut p);

        p.finish(Self {
            db,
            nats,
            admin,
            listen_channel,
            check_listener_interval,
            pool_size,
            batch_size,
            pubsub_grace: Duration::from_secs(grace),
            pubsub_keys_table,
            notify_dedup,
            direct_channels,
            table_topics,
            capture_slot,
            class_per_subscriber,
            history,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<BridgeConfig, ConfigError> {
        BridgeConfig::from_settings(&Settings::from_pairs(pairs).expect("settings load"))
    }

    #[test]
    fn defaults() {
        let c = config(&[("PGWS_DB_URI", "postgres://localhost/db")]).expect("valid");
        assert_eq!(c.db.uri, "postgres://localhost/db");
        assert_eq!(c.db.retries, 5);
        assert_eq!(c.listen_channel, DEFAULT_LISTEN_CHANNEL);
        assert_eq!(c.check_listener_interval, None);
        assert_eq!(c.pool_size, 10);
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.admin.addr.port(), 9101);
        assert_eq!(c.nats.subjects.notify(), "pgws.notify");
        assert!(c.notify_dedup);
        assert!(c.table_topics.is_empty());
        assert_eq!(c.capture_slot, "pgws_pgws");
        assert!(!c.class_per_subscriber);
    }

    #[test]
    fn table_topics_are_tables_or_schemas() {
        let c = config(&[
            ("PGWS_DB_URI", "postgres://x"),
            ("PGWS_TABLE_TOPICS", "public.orders, items ,app.*"),
            ("PGWS_NATS_PREFIX", "My-Stack"),
        ])
        .expect("valid");
        let t = |schema: &str, table: Option<&str>| TablePattern {
            schema: schema.into(),
            table: table.map(Into::into),
        };
        assert_eq!(
            c.table_topics,
            [
                t("public", Some("orders")),
                t("public", Some("items")),
                t("app", None)
            ]
        );
        assert_eq!(c.capture_slot, "pgws_my_stack");
        for bad in ["a.b.c", ".x", "x.", "*", "a.\u{1}"] {
            assert!(TablePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_are_read() {
        let c = config(&[
            ("PGWS_DB_URI", "postgres://x"),
            ("PGWS_LISTEN_CHANNEL", "chan"),
            ("PGWS_CHECK_LISTENER_INTERVAL", "1500"),
            ("PGWS_POOL_SIZE", "3"),
            ("PGWS_BATCH_SIZE", "7"),
            ("PGWS_NATS_PREFIX", "t1"),
            ("PGWS_ADMIN_PORT", "0"),
        ])
        .expect("valid");
        assert_eq!(c.listen_channel, "chan");
        assert_eq!(c.check_listener_interval, Some(Duration::from_millis(1500)));
        assert_eq!((c.pool_size, c.batch_size), (3, 7));
        assert_eq!(c.nats.subjects.bridge_queue(), "t1.bridge");
        assert_eq!(c.admin.addr.port(), 0);
    }

    #[test]
    fn every_problem_is_reported() {
        let long = "x".repeat(64);
        let err = config(&[
            ("PGWS_LISTEN_CHANNEL", &long),
            ("PGWS_CHECK_LISTENER_INTERVAL", "0"),
            ("PGWS_POOL_SIZE", "101"),
            ("PGWS_BATCH_SIZE", "0"),
            ("PGWS_RETRIES", "many"),
        ])
        .expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.problems.len(), 6, "{text}");
        for needle in [
            "PGWS_DB_URI",
            "PGWS_LISTEN_CHANNEL",
            "PGWS_CHECK_LISTENER_INTERVAL",
            "PGWS_POOL_SIZE",
            "PGWS_BATCH_SIZE",
            "PGWS_RETRIES",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn pool_size_zero_and_bad_numbers_are_refused() {
        let err = config(&[
            ("PGWS_DB_URI", "postgres://x"),
            ("PGWS_POOL_SIZE", "0"),
            ("PGWS_BATCH_SIZE", "-3"),
        ])
        .expect_err("invalid");
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn a_malformed_uri_is_reported() {
        let err = config(&[("PGWS_DB_URI", "postgres://u@h:notaport/db")]).expect_err("invalid");
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].starts_with("PGWS_DB_URI: "), "{err}");
    }

    #[test]
    fn a_63_byte_channel_is_fine() {
        let c = config(&[
            ("PGWS_DB_URI", "postgres://x"),
            ("PGWS_LISTEN_CHANNEL", &"é".repeat(31)),
        ])
        .expect("62 bytes is valid");
        assert_eq!(c.listen_channel.len(), 62);
    }
}
