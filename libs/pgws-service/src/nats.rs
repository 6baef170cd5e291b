//! The NATS connection a service opens when its roles talk over NATS: named, retrying forever
//! in the background, so a service starts while NATS is down and becomes ready when it comes
//! up. Subscriptions are restored by the client after a reconnect; the [`NatsLink`] also
//! counts reconnects, for services that tell their clients something may have been missed
//! meanwhile. The services see the connection as a [`pgws_bus::Client`] (the bus seam) and,
//! for the audit, a [`JetStreamLog`]; async-nats stays behind this module and `pgws-bus`. Credentials
//! (user and password, token, NKey, credentials file) and TLS come from `PGWS_NATS_*`. Each
//! service takes its replies under its own inbox prefix (`_INBOX.<prefix>.<name>`), so a NATS
//! user's subscribe permission can stop at its own replies.

use anyhow::Context as _;
use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event};
use pgws_bus::{JetStreamHistory, JetStreamLog, Nats};
use pgws_config::{NatsAuth, NatsConfig};
use tokio::sync::watch;

use crate::Readiness;

/// A NATS connection: the bus over it, its JetStream, and how many times it came back.
#[derive(Debug, Clone)]
pub struct NatsLink {
    client: Client,
    /// How many times the connection came back after it was lost (the first connection does
    /// not count).
    pub reconnects: watch::Receiver<u64>,
}

impl NatsLink {
    /// The bus on this connection.
    pub fn bus(&self) -> pgws_bus::Client {
        pgws_bus::Client::new(Nats::new(self.client.clone()))
    }

    /// JetStream on this connection (for the audit stream's provisioning).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }

    /// The durable log of `stream` on this connection; records not acknowledged within
    /// `ack_wait` come again.
    pub fn log(&self, stream: &str, ack_wait: std::time::Duration) -> JetStreamLog {
        JetStreamLog::new(self.jetstream(), stream, ack_wait)
    }

    /// The history kept in `stream` on this connection.
    pub fn history(&self, stream: &str) -> JetStreamHistory {
        JetStreamHistory::new(self.jetstream(), stream)
    }
}

/// Connects to `config.url` (comma-separated for a cluster) with its credentials and TLS, and
/// registers the `nats` readiness check.
pub async fn connect_nats(
    config: &NatsConfig,
    name: &str,
    readiness: &Readiness,
) -> anyhow::Result<NatsLink> {
    let (client, reconnects) = connect_watched(config, name, readiness).await?;
    Ok(NatsLink { client, reconnects })
}

/// The options for `auth`.
async fn options(auth: &NatsAuth) -> anyhow::Result<ConnectOptions> {
    let mut options = match (&auth.user, &auth.token, &auth.nkey, &auth.creds) {
        (Some((user, password)), ..) => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        (_, Some(token), ..) => ConnectOptions::with_token(token.clone()),
        (_, _, Some(seed), _) => ConnectOptions::with_nkey(seed.clone()),
        (.., Some(creds)) => ConnectOptions::with_credentials_file(creds.clone())
            .await
            .with_context(|| format!("reading the NATS credentials file {creds:?}"))?,
        _ => ConnectOptions::new(),
    };
    if auth.tls {
        options = options.require_tls(true);
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &auth.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// The connection, with the number of times it came back after it was lost.
async fn connect_watched(
    config: &NatsConfig,
    name: &str,
    readiness: &Readiness,
) -> anyhow::Result<(Client, watch::Receiver<u64>)> {
    let (reconnects_tx, reconnects) = watch::channel(0u64);
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls: Vec<&str> = config.url.split(',').map(str::trim).collect();
    let client = options(&config.auth)
        .await?
        .name(name)
        .custom_inbox_prefix(config.subjects.inbox_prefix(name))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let (lost, reconnects_tx) = (lost.clone(), reconnects_tx.clone());
            async move {
                tracing::info!(%event, "nats connection event");
                match event {
                    Event::Disconnected => lost.store(true, std::sync::atomic::Ordering::Relaxed),
                    Event::Connected if lost.swap(false, std::sync::atomic::Ordering::Relaxed) => {
                        reconnects_tx.send_modify(|n| *n += 1);
                    }
                    _ => {}
                }
            }
        })
        .connect(urls.as_slice())
        .await?;
    let probe = client.clone();
    readiness.add("nats", move || probe.connection_state() == State::Connected);
    Ok((client, reconnects))
}

/// How long a stopping service waits for NATS to take what it still has to send.
pub(crate) const FLUSH_AT_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Flushes what `client` still has to send as the service stops, waiting at most
/// [`FLUSH_AT_STOP`]: a NATS server that is gone or stalled cannot hold the stop. What could
/// not be flushed is a warning.
pub async fn flush_at_stop(client: &pgws_bus::Client) {
    match tokio::time::timeout(FLUSH_AT_STOP, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "NATS could not be flushed at stop"),
        Err(_) => tracing::warn!(
            wait_s = FLUSH_AT_STOP.as_secs(),
            "NATS was not flushed in time at stop; what was still buffered is lost"
        ),
    }
}
