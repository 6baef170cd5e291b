//! The NATS connection every service opens: named, retrying forever in the background, so a
//! service starts while NATS is down and becomes ready when it comes up. Subscriptions are
//! restored by the client after a reconnect; [`connect_nats_watched`] also counts reconnects,
//! for services that tell their clients something may have been missed meanwhile.

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event};
use tokio::sync::watch;

use crate::Readiness;

/// Connects to `url` (comma-separated for a cluster) and registers the `nats` readiness check.
pub async fn connect_nats(
    url: &str,
    name: &str,
    readiness: &Readiness,
) -> Result<Client, async_nats::ConnectError> {
    Ok(connect_nats_watched(url, name, readiness).await?.0)
}

/// Like [`connect_nats`], with the number of times the connection came back after it was
/// lost (the first connection does not count).
pub async fn connect_nats_watched(
    url: &str,
    name: &str,
    readiness: &Readiness,
) -> Result<(Client, watch::Receiver<u64>), async_nats::ConnectError> {
    let (reconnects_tx, reconnects) = watch::channel(0u64);
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    let client = ConnectOptions::new()
        .name(name)
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
