//! The recorder's configuration, validated at start with every problem listed.

use std::time::Duration;

use pgws_config::keys;
use pgws_config::{
    AdminConfig, AuditConfig, ConfigError, DbConfig, NatsConfig, Problems, Settings,
};

/// Everything the recorder needs.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// `PGWS_DB_URI`.
    pub db: DbConfig,
    /// `PGWS_NATS_URL`, `PGWS_NATS_PREFIX`.
    pub nats: NatsConfig,
    /// Admin listener (default port 9102).
    pub admin: AdminConfig,
    /// The audit stream's limits (the recorder creates it when it starts first).
    pub audit: AuditConfig,
    /// `PGWS_RECORDER_BATCH_SIZE` (default 1000): most records per transaction.
    pub batch_size: usize,
    /// `PGWS_RECORDER_BATCH_WAIT` (ms, default 20): how long a batch may wait to fill.
    pub batch_wait: Duration,
    /// `PGWS_RECORDER_DISPATCHER`: a function `f(channel text, payload text)` called for each
    /// record instead of writing `pgws_audit.messages` (the quoted, validated name).
    pub dispatcher: Option<String>,
    /// `PGWS_RECORDER_RETENTION_DAYS`: daily partitions older than this are dropped.
    pub retention_days: Option<u32>,
}

impl RecorderConfig {
    /// Reads and validates the settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut p = Problems::new(settings);
        let db = DbConfig::read(&mut p);
        let nats = NatsConfig::read(&mut p);
        let admin = AdminConfig::read_for(&mut p, env!("CARGO_PKG_NAME"));
        let audit = AuditConfig::read(&mut p);
        let batch_size: usize = p.parse_or(keys::RECORDER_BATCH_SIZE, 1000);
        if !(1..=10_000).contains(&batch_size) {
            p.push("PGWS_RECORDER_BATCH_SIZE: must be 1 to 10000");
        }
        let wait: u64 = p.parse_or(keys::RECORDER_BATCH_WAIT, 20);
        if wait == 0 {
            p.push("PGWS_RECORDER_BATCH_WAIT: must be at least 1 ms");
        }
        let dispatcher = p.text(keys::RECORDER_DISPATCHER).and_then(|f| match quote_function(&f) {
            Some(q) => Some(q),
            None => {
                p.push(format!(
                    "PGWS_RECORDER_DISPATCHER: {f:?} is not a function name (name or schema.name of letters, digits and _)"
                ));
                None
            }
        });
        let retention_days: Option<u32> = p.parse(keys::RECORDER_RETENTION_DAYS);
        if retention_days == Some(0) {
            p.push("PGWS_RECORDER_RETENTION_DAYS: must be at least 1");
        }
        p.finish(Self {
            db,
            nats,
            admin,
            audit,
            batch_size,
            batch_wait: Duration::from_millis(wait),
            dispatcher,
            retention_days,
        })
    }
}

/// `f` or `schema.f`, each part an identifier, quoted for SQL.
fn quote_function(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    ok.then(|| {
        parts
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(".")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_validated_and_quoted() {
        assert_eq!(
            quote_function("record_it").as_deref(),
            Some("\"record_it\"")
        );
        assert_eq!(
            quote_function("app.Record_1").as_deref(),
            Some("\"app\".\"Record_1\"")
        );
        for bad in ["", "1f", "a.b.c", "f()", "f; drop table x", "a.", "\"f\""] {
            assert_eq!(quote_function(bad), None, "{bad}");
        }
    }

    #[test]
    fn problems_are_collected() {
        let s = Settings::from_pairs(&[
            ("PGWS_RECORDER_BATCH_SIZE", "0"),
            ("PGWS_RECORDER_DISPATCHER", "f()"),
            ("PGWS_RECORDER_RETENTION_DAYS", "0"),
        ])
        .expect("settings");
        let e = RecorderConfig::from_settings(&s).expect_err("invalid");
        assert_eq!(e.problems.len(), 4, "{e}");
    }
}
