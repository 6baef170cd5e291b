//! Opening PostgreSQL connections: one parsed configuration, bounded connect attempts, and
//! the start-up rule of postgres-websockets (`PGWS_RETRIES` attempts, then give up).

use std::time::Duration;

use pgws_config::DbConfig;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, Connection, NoTls, Socket};
use tokio_util::sync::CancellationToken;

/// A connection's I/O half, driven by its owner.
pub(crate) type PgConnection = Connection<Socket, NoTlsStream>;

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
) -> Result<(Client, PgConnection), tokio_postgres::Error> {
    config.connect(NoTls).await
}

/// The first connection of the process: `retries` attempts (at least one), 1 s doubling
/// between them. `Ok(None)` when shutdown was requested meanwhile.
pub(crate) async fn connect_first(
    config: &Config,
    retries: u32,
    token: &CancellationToken,
) -> anyhow::Result<Option<(Client, PgConnection)>> {
    let attempts = retries.max(1);
    let mut attempt = 0;
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => return Ok(None),
            r = connect(config) => r,
        };
        let error = match result {
            Ok(pair) => return Ok(Some(pair)),
            Err(e) => e,
        };
        attempt += 1;
        if attempt >= attempts {
            return Err(anyhow::Error::new(error).context(format!(
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
