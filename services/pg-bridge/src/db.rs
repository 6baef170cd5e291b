//! Opening PostgreSQL connections: one parsed configuration, bounded connect attempts, and
//! the start-up rule of postgres-websockets (`PGWS_RETRIES` attempts, then give up).

use std::sync::Arc;
use std::time::Duration;

use pgws_config::DbConfig;
use pgws_service::prometheus_client::metrics::counter::Counter;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, Connection, NoTls, Socket};
use tokio_util::sync::CancellationToken;

use pgws_service::Shutdown;
use tokio::sync::Mutex;

use crate::wire::{self, Io, Mended};

/// Creates `table` with `ddl` (run in a transaction, serialised with other bridges, and with
/// the other tables of its schema, by an advisory lock on the schema's name: two sessions
/// running `CREATE SCHEMA IF NOT EXISTS` at once can otherwise fail) unless it exists.
/// Checking first means the CREATE privilege is only needed when the table is missing: an
/// administrator may create it beforehand. A failure is rolled back, so the session is never
/// left in an aborted transaction.
pub(crate) async fn ensure_table(
    client: &Client,
    table: &str,
    ddl: &str,
) -> Result<(), tokio_postgres::Error> {
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get::<_, bool>(0);
    if exists {
        return Ok(());
    }
    let schema = table.split_once('.').map_or(table, |(schema, _)| schema);
    let lock = format!(
        "SELECT pg_advisory_xact_lock(hashtext({}))",
        quote_literal(schema)
    );
    let created = client
        .batch_execute(&format!("BEGIN; {lock}; {ddl}; COMMIT;"))
        .await;
    if created.is_err() {
        // The batch stopped at the error, inside its transaction.
        drop(client.batch_execute("ROLLBACK").await);
    }
    created
}

/// A SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A connection opened on first use and opened again on the next use after it failed, shared
/// by concurrent requests (the request services: API keys, `/live` topics).
pub(crate) struct LazyClient {
    pg: Config,
    /// What the connection serves, for the logs.
    what: &'static str,
    shutdown: Shutdown,
    slot: Mutex<Option<Arc<Client>>>,
}

impl LazyClient {
    pub(crate) fn new(pg: Config, what: &'static str, shutdown: Shutdown) -> Self {
        Self {
            pg,
            what,
            shutdown,
            slot: Mutex::new(None),
        }
    }

    /// The open connection, or a new one; `fresh` is true when it was just opened.
    pub(crate) async fn get(&self) -> Result<(Arc<Client>, bool), tokio_postgres::Error> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok((Arc::clone(c), false));
        }
        let (client, connection) = connect(&self.pg).await.inspect_err(|e| {
            tracing::warn!(error = %e, what = self.what, "connection failed");
        })?;
        let what = self.what;
        self.shutdown.spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, what, "connection lost");
            }
        });
        Ok((Arc::clone(slot.insert(Arc::new(client))), true))
    }
}

/// The LISTEN connection's I/O half, driven by its owner: its notifications are mended
/// ([`crate::wire`]).
pub(crate) type PgConnection = Connection<Mended<Box<dyn Io>>, NoTlsStream>;

/// Bound on one connection attempt when the URI sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `PGWS_DB_URI` and fills in what the bridge wants when the URI leaves it unset.
pub(crate) fn pg_config(uri: &str) -> Result<Config, tokio_postgres::Error> {
    let mut config: Config = uri.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("pg-bridge");
    }
    Ok(config)
}

/// One connection attempt.
pub(crate) async fn connect(
    config: &Config,
) -> Result<(Client, Connection<Socket, NoTlsStream>), tokio_postgres::Error> {
    config.connect(NoTls).await
}

/// One attempt at a connection that will LISTEN: its notifications are made valid UTF-8
/// (counted in `mended`) instead of failing the connection.
pub(crate) async fn connect_listening(
    config: &Config,
    mended: &Counter,
) -> anyhow::Result<(Client, PgConnection)> {
    let socket = wire::open(config).await?;
    let stream = Mended::new(socket, mended.clone());
    Ok(config.connect_raw(stream, NoTls).await?)
}

/// The first connection of the process: `retries` attempts (at least one), 1 s doubling
/// between them. `Ok(None)` when shutdown was requested meanwhile.
pub(crate) async fn connect_first(
    config: &Config,
    mended: &Counter,
    retries: u32,
    token: &CancellationToken,
) -> anyhow::Result<Option<(Client, PgConnection)>> {
    let attempts = retries.max(1);
    let mut attempt = 0;
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => return Ok(None),
            r = connect_listening(config, mended) => r,
        };
        let error = match result {
            Ok(pair) => return Ok(Some(pair)),
            Err(e) => e,
        };
        attempt += 1;
        if attempt >= attempts {
            return Err(error.context(format!(
                "cannot connect to the database after {attempts} attempts"
            )));
        }
        let delay = DbConfig::backoff(attempt - 1);
        tracing::warn!(attempt, attempts, delay_s = delay.as_secs(), error = %error, "database connection failed, retrying");
        tokio::select! {
            _ = token.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(
            quote_ident("postgres-websockets-listener"),
            "\"postgres-websockets-listener\""
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = pg_config("postgres://u@h/db").expect("parses");
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_application_name(), Some("pg-bridge"));
        let c =
            pg_config("postgres://u@h/db?connect_timeout=3&application_name=x").expect("parses");
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(c.get_application_name(), Some("x"));
    }
}
