//! API-key checks for wspubsub publishers, a request service every bridge serves.
//!
//! The gateway holds no database credentials, so it asks the bridges (queue group
//! `<prefix>.bridge` on `<prefix>.apikey`) whether a key may publish in a domain:
//! `SELECT 1 FROM <PGWS_PUBSUB_KEYS_TABLE> WHERE apikey = $1 AND domain = $2 AND active`,
//! the query of wspubsub. Nothing is cached: a key made inactive stops the next publisher's
//! handshake. A bridge that cannot reach the database answers `unavailable` (the gateway
//! refuses the handshake with 503, not 403).
//!
//! Bounds: one connection per bridge (re-opened on the next request after it failed),
//! at most [`CONCURRENCY`] checks in flight; the rest wait in the bus subscription.

use futures::StreamExt as _;
use pgws_bus::Client as Bus;
use pgws_proto::{Ack, KeyCheck, Subjects, MAX_APIKEY, MAX_DOMAIN};
use pgws_service::Shutdown;
use tokio_postgres::Config;
use tokio_util::sync::CancellationToken;

use crate::bus::reply;
use crate::db::{quote_ident, LazyClient};
use crate::metrics::BridgeMetrics;

/// Checks in flight per bridge.
const CONCURRENCY: usize = 16;

/// The key-check service; [`Keys::run`] is its task.
pub(crate) struct Keys {
    pub(crate) pg: Config,
    /// `PGWS_PUBSUB_KEYS_TABLE`, possibly schema-qualified.
    pub(crate) table: String,
    pub(crate) subjects: Subjects,
    pub(crate) bus: Bus,
    pub(crate) metrics: BridgeMetrics,
    pub(crate) shutdown: Shutdown,
}

impl Keys {
    /// Serves key checks until `token` is cancelled.
    pub(crate) async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        let sub = self
            .bus
            .queue_subscribe(self.subjects.apikey(), self.subjects.bridge_queue())
            .await?;
        let sql = format!(
            "SELECT 1 FROM {} WHERE apikey = $1 AND domain = $2 AND active",
            qualified(&self.table)
        );
        let conn = LazyClient::new(self.pg.clone(), "key checks", self.shutdown.clone());
        let this = &self;
        let serving = sub.for_each_concurrent(CONCURRENCY, |m| {
            let (conn, sql) = (&conn, sql.as_str());
            async move {
                let answer = match serde_json::from_slice::<KeyCheck>(&m.payload) {
                    Ok(check) => this.check(conn, sql, &check).await,
                    Err(e) => Ack::unavailable(format!("invalid key check: {e}")),
                };
                let outcome = match (&answer.error, answer.ok) {
                    (Some(_), _) => "error",
                    (None, true) => "valid",
                    (None, false) => "refused",
                };
                this.metrics
                    .key_checks
                    .get_or_create(&[("outcome", outcome)])
                    .inc();
                reply(&this.bus, m.reply.as_ref(), &answer).await;
            }
        });
        tokio::select! {
            _ = token.cancelled() => {}
            _ = serving => anyhow::bail!("the key-check subscription ended"),
        }
        Ok(())
    }

    async fn check(&self, conn: &LazyClient, sql: &str, check: &KeyCheck) -> Ack {
        // No key or domain is that long or holds a NUL (which PostgreSQL text cannot): no
        // query for them.
        let (key, domain) = (&check.apikey, &check.domain);
        if key.len() > MAX_APIKEY
            || domain.len() > MAX_DOMAIN
            || key.contains('\0')
            || domain.contains('\0')
        {
            return Ack::answer(false);
        }
        let Ok((client, _)) = conn.get().await else {
            return Ack::unavailable("database unavailable");
        };
        match client.query_opt(sql, &[&check.apikey, &check.domain]).await {
            Ok(row) => Ack::answer(row.is_some()),
            Err(e) => {
                tracing::warn!(error = %e, "key check failed");
                Ack::unavailable("key check failed")
            }
        }
    }
}

/// `schema.table` or `table` as quoted SQL.
fn qualified(table: &str) -> String {
    table
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_quoted_part_by_part() {
        assert_eq!(qualified("apikeys"), "\"apikeys\"");
        assert_eq!(qualified("auth.api keys"), "\"auth\".\"api keys\"");
    }
}
