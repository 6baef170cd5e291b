//! Client messages on their way to the database.
//!
//! A socket's accepted frames become [`Notification`]s and are handed to the bridges as a
//! NATS request; the bridge replies once the NOTIFYs are committed. One request per socket is
//! in flight at a time, so a socket's messages reach PostgreSQL in the order they were sent
//! whichever bridge serves each request; what arrives meanwhile waits in the socket's bounded
//! pending queue and goes in the next request. A request that finds no bridge, times out or
//! fails is retried with backoff until `PGWS_NOTIFY_TIMEOUT`; then the client gets an error
//! frame for each message in it.

use std::time::Duration;

use futures::future::BoxFuture;
use pgws_proto::{Notification, NotifyReply, NotifyRequest};
use tokio::time::Instant;

/// At most this many notifications per request (NATS payloads are limited to 1 MiB by default;
/// 64 envelopes of at most 8 KB fit).
pub(crate) const MAX_PER_REQUEST: usize = 64;

/// Sends NOTIFY requests to the bridges.
#[derive(Clone, Debug)]
pub(crate) struct Uplink {
    client: async_nats::Client,
    subject: String,
    deadline: Duration,
}

impl Uplink {
    pub(crate) fn new(client: async_nats::Client, subject: String, deadline: Duration) -> Self {
        Self {
            client,
            subject,
            deadline,
        }
    }

    /// Hands `notifications` to a bridge; resolves when they are committed (`Ok`) or when the
    /// deadline passed (`Err` with the last reason).
    pub(crate) fn send(
        &self,
        notifications: Vec<Notification>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let client = self.client.clone();
        let subject = self.subject.clone();
        let deadline = Instant::now() + self.deadline;
        Box::pin(async move {
            let body = serde_json::to_vec(&NotifyRequest { notifications })
                .map_err(|e| format!("cannot encode request: {e}"))?;
            let body = bytes::Bytes::from(body);
            let mut backoff = Duration::from_millis(50);
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err("no bridge committed the message in time".to_owned());
                }
                let attempt = (deadline - now).min(Duration::from_secs(5));
                let error = match tokio::time::timeout(
                    attempt,
                    client.request(subject.clone(), body.clone()),
                )
                .await
                {
                    Ok(Ok(reply)) => match serde_json::from_slice::<NotifyReply>(&reply.payload) {
                        Ok(r) if r.ok => return Ok(()),
                        Ok(r) => r.error.unwrap_or_else(|| "bridge failed".to_owned()),
                        Err(e) => format!("unreadable bridge reply: {e}"),
                    },
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "bridge did not answer".to_owned(),
                };
                tracing::debug!(error, "notify request failed; retrying");
                let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        })
    }
}
