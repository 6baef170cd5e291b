//! Answering requests that came over NATS: every request service of the bridge replies
//! through here.

use async_nats::{Client as Nats, Subject};
use serde::Serialize;

/// Sends `body` as JSON to `to` when the request asked for a reply.
pub(crate) async fn reply<T: Serialize>(nats: &Nats, to: Option<&Subject>, body: &T) {
    let Some(to) = to else { return };
    let bytes = match serde_json::to_vec(body) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            return;
        }
    };
    if let Err(e) = nats.publish(to.clone(), bytes.into()).await {
        tracing::warn!(error = %e, "cannot send a reply");
    }
}
