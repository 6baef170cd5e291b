//! The NATS connection every service opens: named, retrying forever in the background, so a
//! service starts while NATS is down and becomes ready when it comes up.

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions};

use crate::Readiness;

/// Connects to `url` (comma-separated for a cluster) and registers the `nats` readiness check.
pub async fn connect_nats(
    url: &str,
    name: &str,
    readiness: &Readiness,
) -> Result<Client, async_nats::ConnectError> {
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    let client = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        })
        .connect(urls.as_slice())
        .await?;
    let probe = client.clone();
    readiness.add("nats", move || probe.connection_state() == State::Connected);
    Ok(client)
}
