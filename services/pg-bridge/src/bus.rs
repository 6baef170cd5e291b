//! Answering requests that came over the bus: every request service of the bridge replies
//! through here.

use pgws_bus::Client as Bus;
use serde::Serialize;

/// Sends `body` as JSON to `to` when the request asked for a reply.
pub(crate) async fn reply<T: Serialize>(bus: &Bus, to: Option<&String>, body: &T) {
    let Some(to) = to else { return };
    let bytes = match serde_json::to_vec(body) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            return;
        }
    };
    if let Err(e) = bus.publish(to, bytes.into()).await {
        tracing::warn!(error = %e, "cannot send a reply");
    }
}
